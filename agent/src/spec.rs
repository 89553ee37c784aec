//! Agent definitions (TOML files and JSON objects share one shape) and their validation.
