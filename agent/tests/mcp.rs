//! MCP tools against real servers installed by `scripts/mcp-servers.sh`: PyPI `mcp-server-time`
//! (stdio) and npm `@modelcontextprotocol/server-everything` (stdio and streamable HTTP). Covers
//! listing, calls, content, name clashes, a crashed child and a hung call. Servers are found under
//! `$KILN_MCP_DIR` (default `~/.cache/kiln/mcp`); a missing one makes its tests print SKIP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::tools::mcp::{McpConfig, McpManager};
use kiln_agent::tools::{invoke, CallLimits, Tool, ToolError, ToolOutcome, ToolRegistry};
use serde_json::{json, Value};

#[path = "support/mcp_servers.rs"]
mod mcp_servers;
use mcp_servers::mcp_dir;

fn time_server(name: &str) -> Option<String> {
    mcp_servers::time_server(name, 30)
}

/// The node the install script chose (`$KILN_MCP_DIR/bin/node`), else the one on PATH.
fn node() -> String {
    let chosen = mcp_dir().join("bin/node");
    if chosen.exists() {
        chosen.display().to_string()
    } else {
        "node".into()
    }
}

/// The everything server's entry script, or None (after printing SKIP).
fn everything_js() -> Option<PathBuf> {
    let js = mcp_dir().join("everything/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    let has_node = std::process::Command::new(node()).arg("--version").output().is_ok_and(|o| o.status.success());
    if !js.is_file() || !has_node {
        eprintln!("SKIP: server-everything or node missing ({}; run scripts/mcp-servers.sh)", js.display());
        return None;
    }
    Some(js)
}

fn everything_stdio(name: &str, extra: &str) -> Option<String> {
    let js = everything_js()?;
    Some(format!(
        "[servers.{name}]\ncommand = {:?}\nargs = [{:?}, \"stdio\"]\n{extra}\n",
        node(),
        js.display().to_string()
    ))
}

async fn start(toml: &str) -> (McpManager, ToolRegistry) {
    let manager = McpManager::start(McpConfig::from_toml(toml).unwrap()).await.unwrap();
    let mut registry = ToolRegistry::new();
    for tool in manager.tools() {
        registry.insert(tool.clone()).unwrap();
    }
    (manager, registry)
}

async fn call(reg: &ToolRegistry, name: &str, args: Value) -> ToolOutcome {
    let tool: &Arc<dyn Tool> = reg.get(name).unwrap_or_else(|| panic!("no tool {name}: {:?}", reg.names()));
    invoke(tool, args, &CallLimits { timeout: Duration::from_secs(60), max_result_bytes: 64 * 1024 }).await
}

#[tokio::test]
async fn time_server_over_stdio() {
    let Some(config) = time_server("time") else { return };
    let (manager, reg) = start(&config).await;
    assert!(reg.names().contains(&"get_current_time") && reg.names().contains(&"convert_time"), "{:?}", reg.names());
    // The exposed schema is the server's inputSchema, as the grammar will constrain calls with it.
    let schema = &reg.get("get_current_time").unwrap().def().parameters;
    assert_eq!(schema["type"], "object");
    assert!(schema["properties"]["timezone"].is_object(), "{schema}");

    let out = call(&reg, "get_current_time", json!({"timezone": "Asia/Tokyo"})).await;
    assert!(!out.is_error, "{}", out.content);
    let result: Value = serde_json::from_str(&out.content).unwrap();
    assert_eq!(result["timezone"], "Asia/Tokyo");
    assert!(result["datetime"].as_str().unwrap().ends_with("+09:00"), "{result}");

    let out = call(&reg, "get_current_time", json!({"timezone": "Mars/Olympus_Mons"})).await;
    assert!(out.is_error && out.content.contains("Mars/Olympus_Mons"), "{}", out.content);
    manager.shutdown().await;
}

#[tokio::test]
async fn everything_server_over_stdio() {
    let Some(config) = everything_stdio("everything", "") else { return };
    let (manager, reg) = start(&config).await;
    for name in ["echo", "get-sum", "get-tiny-image", "trigger-long-running-operation"] {
        assert!(reg.get(name).is_some(), "{name} missing from {:?}", reg.names());
    }
    let out = call(&reg, "echo", json!({"message": "hello MCP"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: hello MCP", false));
    let out = call(&reg, "get-sum", json!({"a": 2, "b": 40})).await;
    assert!(!out.is_error && out.content.contains("42"), "{}", out.content);
    // Images are described, not pasted as base64.
    let out = call(&reg, "get-tiny-image", json!({})).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(out.content.contains("bytes image/png]") && !out.content.contains("iVBOR"), "{}", out.content);
    // Arguments the server's schema refuses come back as an error result, not a crash.
    let out = call(&reg, "get-sum", json!({"a": "two"})).await;
    assert!(out.is_error, "{}", out.content);
    manager.shutdown().await;
}

/// A free port: bind :0, read it, let it go (the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `server-everything streamableHttp` on `port` and waits until it listens.
async fn http_everything(js: &std::path::Path, port: u16) -> tokio::process::Child {
    let server = tokio::process::Command::new(node())
        .args([js.to_str().unwrap(), "streamableHttp"])
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "server-everything did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server
}

#[tokio::test]
async fn everything_server_over_streamable_http() {
    let Some(js) = everything_js() else { return };
    let port = free_port();
    let mut server = http_everything(&js, port).await;
    let config = format!("[servers.web]\nurl = \"http://127.0.0.1:{port}/mcp\"\nprefix = \"web_\"\ntimeout_secs = 2\n");
    let (manager, reg) = start(&config).await;
    assert!(reg.names().iter().all(|n| n.starts_with("web_")), "{:?}", reg.names());
    let out = call(&reg, "web_echo", json!({"message": "over http"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: over http", false));
    let out = call(&reg, "web_get-sum", json!({"a": 1.5, "b": 2})).await;
    assert!(!out.is_error && out.content.contains("3.5"), "{}", out.content);

    // A hung call over HTTP: timed out, then the session is re-established for the next call.
    let out = call(&reg, "web_trigger-long-running-operation", json!({"duration": 5, "steps": 5})).await;
    assert!(out.is_error && out.content.contains("timed out after 2 s"), "{}", out.content);
    let out = call(&reg, "web_echo", json!({"message": "again"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: again", false));

    // The server goes away: calls fail (as results) until it is back, then reconnect on their own.
    server.kill().await.unwrap();
    let out = call(&reg, "web_echo", json!({"message": "gone"})).await;
    assert!(out.is_error, "{}", out.content);
    let _server = http_everything(&js, port).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = call(&reg, "web_echo", json!({"message": "back"})).await;
        if !out.is_error {
            assert_eq!(out.content, "Echo: back");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reconnected: {}", out.content);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    manager.shutdown().await;
}

#[tokio::test]
async fn name_clashes_are_startup_errors_unless_prefixed() {
    let (Some(a), Some(b)) = (everything_stdio("alpha", ""), everything_stdio("beta", "")) else { return };
    let err = McpManager::start(McpConfig::from_toml(&format!("{a}\n{b}")).unwrap()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ToolError::Mcp { .. }) && text.contains("\"alpha\"") && text.contains("\"beta\""), "{text}");

    let b = everything_stdio("beta", "prefix = \"b_\"").unwrap();
    let (manager, reg) = start(&format!("{a}\n{b}")).await;
    assert!(reg.get("echo").is_some() && reg.get("b_echo").is_some());
    let out = call(&reg, "b_echo", json!({"message": "from beta"})).await;
    assert_eq!(out.content, "Echo: from beta");
    manager.shutdown().await;
}

#[tokio::test]
async fn startup_failures_name_the_server() {
    let config = "[servers.ghost]\ncommand = \"/nonexistent/kiln-mcp-server\"\ntimeout_secs = 5\n";
    let err = McpManager::start(McpConfig::from_toml(config).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("\"ghost\"") && err.contains("spawn"), "{err}");
}

fn kill(pid: u32) {
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_crashed_server_fails_one_call_and_is_restarted() {
    let Some(config) = everything_stdio("everything", "timeout_secs = 30") else { return };
    let (manager, reg) = start(&config).await;
    let first_pid = manager.server_pid("everything").await.unwrap();

    // Kill the child while a call is in flight: that call is an error result.
    let long = reg.get("trigger-long-running-operation").unwrap().clone();
    let in_flight =
        tokio::spawn(async move { invoke(&long, json!({"duration": 10, "steps": 10}), &CallLimits::default()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(first_pid);
    let out = in_flight.await.unwrap();
    assert!(out.is_error, "{}", out.content);
    assert!(out.elapsed < Duration::from_secs(8), "the crash was noticed only at the end: {:?}", out.elapsed);

    // The next call restarts the server and works.
    let out = call(&reg, "echo", json!({"message": "back"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: back", false));
    let second_pid = manager.server_pid("everything").await.unwrap();
    assert_ne!(first_pid, second_pid);

    // A crash between calls is noticed before the next call, which then just works.
    kill(second_pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = call(&reg, "echo", json!({"message": "still here"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: still here", false));
    manager.shutdown().await;
}

#[tokio::test]
async fn a_hung_call_times_out_and_the_server_is_restarted() {
    let Some(config) = everything_stdio("everything", "timeout_secs = 1") else { return };
    let (manager, reg) = start(&config).await;
    let first_pid = manager.server_pid("everything").await.unwrap();
    let out = call(&reg, "trigger-long-running-operation", json!({"duration": 5, "steps": 5})).await;
    assert!(out.is_error, "{}", out.content);
    assert!(out.content.contains("timed out after 1 s"), "{}", out.content);
    assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
    let out = call(&reg, "echo", json!({"message": "fresh"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: fresh", false));
    assert_ne!(manager.server_pid("everything").await.unwrap(), first_pid);

    // After shutdown the child is gone and calls fail cleanly.
    let pid = manager.server_pid("everything").await.unwrap();
    manager.shutdown().await;
    assert!(manager.server_pid("everything").await.is_none());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "child {pid} outlived shutdown");
    let out = call(&reg, "echo", json!({"message": "late"})).await;
    assert!(out.is_error, "{}", out.content);
}

#[tokio::test]
async fn a_call_abandoned_by_the_tool_loop_restarts_the_server() {
    // The tool loop's limit (1 s) is shorter than the server's (30 s): invoke drops the call, and
    // the server, maybe still busy with it, is replaced before the next call.
    let Some(config) = everything_stdio("everything", "timeout_secs = 30") else { return };
    let (manager, reg) = start(&config).await;
    let first_pid = manager.server_pid("everything").await.unwrap();
    let long = reg.get("trigger-long-running-operation").unwrap();
    let limits = CallLimits { timeout: Duration::from_secs(1), max_result_bytes: 1000 };
    let out = invoke(long, json!({"duration": 10, "steps": 10}), &limits).await;
    assert_eq!(out.content, "tool trigger-long-running-operation timed out after 1 s");
    let out = call(&reg, "echo", json!({"message": "next"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: next", false));
    assert_ne!(manager.server_pid("everything").await.unwrap(), first_pid);
    manager.shutdown().await;
}

#[tokio::test]
async fn restarts_back_off_while_the_server_cannot_start() {
    let Some(js) = everything_js() else { return };
    // A launcher that refuses to start while a flag file exists: the server "breaks" on demand.
    let flag = std::env::temp_dir().join(format!("kiln-mcp-broken-{}", std::process::id()));
    let script = format!("[ -e '{}' ] && exit 1; exec '{}' '{}' stdio", flag.display(), node(), js.display());
    let config = format!("[servers.flaky]\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\ntimeout_secs = 10\n");
    let (manager, reg) = start(&config).await;
    std::fs::write(&flag, "").unwrap();
    kill(manager.server_pid("flaky").await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // First call after the crash: one immediate restart attempt, which fails.
    let out = call(&reg, "echo", json!({"message": "x"})).await;
    assert!(out.is_error && out.content.contains("failed to start"), "{}", out.content);
    // Right after: no new attempt, the model is told when the next one is due.
    let out = call(&reg, "echo", json!({"message": "x"})).await;
    assert!(out.is_error && out.content.contains("next restart attempt in"), "{}", out.content);
    assert!(out.elapsed < Duration::from_millis(100), "{:?}", out.elapsed);

    // Fixed, and the backoff (500 ms after one failure) has passed: it works again.
    std::fs::remove_file(&flag).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let out = call(&reg, "echo", json!({"message": "healed"})).await;
    assert_eq!((out.content.as_str(), out.is_error), ("Echo: healed", false));
    manager.shutdown().await;
}

/// Live processes whose process group is `pgid` (field 5 of /proc/PID/stat).
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let stat_pgrp = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: split after it.
        // A zombie (killed, not yet reaped by whoever inherited it) no longer runs: not counted.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            return None;
        }
        fields.get(2)?.parse::<u32>().ok()
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|pid| stat_pgrp(pid) == Some(pgid))
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

#[tokio::test]
async fn shutdown_kills_what_the_server_spawned() {
    let Some(js) = everything_js() else { return };
    if !std::path::Path::new("/proc/self/stat").exists() {
        eprintln!("SKIP: no /proc to inspect process groups");
        return;
    }
    // A server with a helper process of its own: the helper must not outlive the server.
    let script = format!("sleep 300 & exec '{}' '{}' stdio", node(), js.display());
    let config = format!("[servers.helper]\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\n");
    let (manager, reg) = start(&config).await;
    let pid = manager.server_pid("helper").await.unwrap();
    assert!(group_members(pid).len() >= 2, "server and helper in one group: {:?}", group_members(pid));
    let out = call(&reg, "echo", json!({"message": "hi"})).await;
    assert_eq!(out.content, "Echo: hi");
    manager.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(group_members(pid), Vec::<u32>::new(), "processes outlived shutdown");
}
