//! Tools an agent may call: one trait, a registry, builtins, HTTP tools and MCP servers.
