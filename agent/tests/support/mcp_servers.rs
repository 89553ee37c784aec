//! Where the real MCP servers installed by `scripts/mcp-servers.sh` live, for the tests that talk
//! to them (`agent/tests/mcp.rs`, and `tests/tests/agent_runs.rs` through `#[path]`): one rule for
//! `$KILN_MCP_DIR` and one `[servers.NAME]` entry for PyPI's `mcp-server-time`.

use std::path::PathBuf;

/// `$KILN_MCP_DIR`, else `~/.cache/kiln/mcp` (where the install script puts them).
pub fn mcp_dir() -> PathBuf {
    match std::env::var_os("KILN_MCP_DIR") {
        Some(dir) => dir.into(),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/mcp"),
    }
}

/// `[servers.NAME]` for the time server (UTC as its local zone), or None (after printing SKIP)
/// when it is not installed.
pub fn time_server(name: &str, timeout_secs: u64) -> Option<String> {
    let dir = mcp_dir().join("time-py");
    if !dir.join("mcp_server_time").is_dir() {
        eprintln!("SKIP: mcp-server-time not installed in {} (run scripts/mcp-servers.sh)", dir.display());
        return None;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    Some(format!(
        "[servers.{name}]\ncommand = {python:?}\nargs = [\"-m\", \"mcp_server_time\", \"--local-timezone\", \"UTC\"]\n\
         env = {{ PYTHONPATH = {:?} }}\ntimeout_secs = {timeout_secs}\n",
        dir.display().to_string()
    ))
}
