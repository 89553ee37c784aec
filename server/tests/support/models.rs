//! Where the server's process tests find the models `scripts/fetch-models.sh` fetched: one rule
//! (`$KILN_MODELS_DIR`, else `~/.cache/kiln/models`) for `shutdown.rs` and `agent_crash.rs`.

use std::path::PathBuf;

pub fn models_dir() -> PathBuf {
    std::env::var_os("KILN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models"))
}
