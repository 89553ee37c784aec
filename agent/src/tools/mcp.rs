//! MCP servers as tools, through the official SDK (`rmcp`): a TOML config of servers (stdio child
//! processes or streamable HTTP endpoints), a manager that connects them all, lists their tools
//! and exposes each as an `Arc<dyn Tool>` whose schema is the server's `inputSchema`. It owns the
//! connections and their recovery: a server that dies or hangs fails that one call (as a result
//! the model reads) and is restarted, with backoff, before the next. It must not decide which
//! agent may use which tool (the agent spec does) nor outlive `shutdown`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{Peer, RoleClient, RunningService, ServiceError, ServiceExt};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Mutex;

use super::{check_tool_name, human_duration, Tool, ToolDef, ToolError};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Restart backoff: the first restart after a failure is immediate, then 0.5 s, 1 s, ... 30 s.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `[servers.NAME]` tables of an MCP config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    #[serde(default)]
    pub servers: BTreeMap<String, McpServerConfig>,
}

/// One server: either `command` (+ `args`, `env`: a stdio child process) or `url` (streamable HTTP).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub url: Option<String>,
    /// Per call, and for connecting (default 60).
    pub timeout_secs: Option<u64>,
    /// Prepended to each tool name (`prefix` + name), to keep two servers' names apart.
    pub prefix: Option<String>,
}

impl McpConfig {
    pub fn from_toml(text: &str) -> Result<Self, ToolError> {
        let config: McpConfig =
            toml::from_str(text).map_err(|e| ToolError::Mcp { server: "(config)".into(), reason: e.to_string() })?;
        for (name, server) in &config.servers {
            server.validate(name)?;
        }
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ToolError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ToolError::Mcp { server: "(config)".into(), reason: format!("{}: {e}", path.display()) })?;
        Self::from_toml(&text)
    }
}

impl McpServerConfig {
    fn validate(&self, name: &str) -> Result<(), ToolError> {
        let bad = |reason: &str| Err(ToolError::Mcp { server: name.into(), reason: reason.into() });
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => return bad("set either command or url, not both"),
            (None, None) => return bad("set command (stdio) or url (streamable HTTP)"),
            (None, Some(_)) if !self.args.is_empty() || !self.env.is_empty() => {
                return bad("args and env apply to command servers only")
            }
            (None, Some(url)) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                return bad("url must be http:// or https://")
            }
            _ => {}
        }
        if self.timeout_secs == Some(0) {
            return bad("timeout_secs must be positive");
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.timeout_secs.map_or(DEFAULT_TIMEOUT, Duration::from_secs)
    }
}

/// The live connection to one server, replaced on restart.
struct Conn {
    service: RunningService<RoleClient, ()>,
    pid: Option<u32>,
    /// Counts connections, so a failure seen on an old one does not tear down its replacement.
    generation: u64,
}

#[derive(Default)]
struct State {
    conn: Option<Conn>,
    generation: u64,
    failures: u32,
    next_attempt: Option<Instant>,
    last_error: String,
    /// After `McpManager::shutdown`: no restarts, every call fails.
    shut_down: bool,
}

/// One configured server and its current connection.
struct Server {
    name: String,
    config: McpServerConfig,
    http: reqwest::Client,
    state: Mutex<State>,
    /// The newest connection generation a call found broken (0: none). Outside the lock and
    /// atomic so that a dropped call can mark it synchronously, before any next call looks.
    suspect: AtomicU64,
}

impl Server {
    /// A peer on a healthy connection, restarting the server first if it died, hung or failed.
    async fn peer(&self) -> Result<(Peer<RoleClient>, u64), String> {
        let mut state = self.state.lock().await;
        if state.shut_down {
            return Err("shut down".into());
        }
        // `is_closed` only reports cancellation; a dead child shows as the service loop gone,
        // which closes the peer's channel.
        let alive = |c: &Conn| !c.service.is_closed() && !c.service.peer().is_transport_closed();
        let healthy = state.conn.as_ref().is_some_and(alive) && self.suspect.load(Ordering::Acquire) < state.generation;
        if !healthy {
            if let Some(at) = state.next_attempt.filter(|at| *at > Instant::now()) {
                let wait = human_duration(at - Instant::now());
                return Err(format!("unavailable ({}); next restart attempt in {wait}", state.last_error));
            }
            self.restart(&mut state).await?;
        }
        let conn = state.conn.as_ref().expect("a healthy state has a connection");
        Ok((conn.service.peer().clone(), conn.generation))
    }

    async fn restart(&self, state: &mut State) -> Result<(), String> {
        if let Some(old) = state.conn.take() {
            tracing::warn!(server = %self.name, pid = ?old.pid, "restarting MCP server");
            close(old).await;
        }
        match tokio::time::timeout(self.config.timeout(), self.connect()).await.unwrap_or_else(|_| {
            Err(format!("no answer to initialize within {}", human_duration(self.config.timeout())))
        }) {
            Ok((service, pid)) => {
                state.generation += 1;
                state.conn = Some(Conn { service, pid, generation: state.generation });
                state.failures = 0;
                state.next_attempt = None;
                tracing::info!(server = %self.name, ?pid, "MCP server connected");
                Ok(())
            }
            Err(e) => {
                let backoff = BACKOFF_BASE.saturating_mul(1 << state.failures.min(6)).min(BACKOFF_MAX);
                state.failures += 1;
                state.next_attempt = Some(Instant::now() + backoff);
                state.last_error = e.clone();
                tracing::error!(server = %self.name, error = %e, backoff_ms = backoff.as_millis() as u64, "MCP server failed to start");
                Err(format!("failed to start: {e}"))
            }
        }
    }

    /// Spawns or dials the server and runs the MCP handshake.
    async fn connect(&self) -> Result<(RunningService<RoleClient, ()>, Option<u32>), String> {
        if let Some(url) = &self.config.url {
            let config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
            let transport = StreamableHttpClientTransport::with_client(self.http.clone(), config);
            let service = ().serve(transport).await.map_err(|e| format!("connect {url}: {e}"))?;
            return Ok((service, None));
        }
        let program = self.config.command.as_deref().unwrap_or_default();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.config.args).envs(&self.config.env);
        // Its own process group: killing it on restart or shutdown also kills what it spawned
        // (`npx` runs the server as a grandchild; some servers start helpers).
        let mut cmd = process_wrap::tokio::CommandWrap::from(cmd);
        cmd.wrap(process_wrap::tokio::ProcessGroup::leader());
        let (child, stderr) = TokioChildProcess::builder(cmd)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {program:?}: {e}"))?;
        let pid = child.id();
        if let Some(stderr) = stderr {
            tokio::spawn(log_stderr(self.name.clone(), stderr));
        }
        let service = ().serve(child).await.map_err(|e| format!("initialize: {e}"))?;
        Ok((service, pid))
    }

    /// Marks the connection of `generation` for restart before the next call. `fetch_max`: a
    /// late failure from an older connection never unmarks a newer one.
    fn mark_broken(&self, generation: u64, why: &str) {
        if self.suspect.fetch_max(generation, Ordering::AcqRel) < generation {
            tracing::warn!(server = %self.name, generation, reason = why, "MCP server marked for restart");
        }
    }

    async fn list_tools(&self) -> Result<Vec<rmcp::model::Tool>, ToolError> {
        let err = |reason: String| ToolError::Mcp { server: self.name.clone(), reason };
        let (peer, _) = self.peer().await.map_err(err)?;
        match tokio::time::timeout(self.config.timeout(), peer.list_all_tools()).await {
            Ok(Ok(tools)) => Ok(tools),
            Ok(Err(e)) => Err(err(format!("tools/list: {e}"))),
            Err(_) => Err(err(format!("tools/list: no answer within {}", human_duration(self.config.timeout())))),
        }
    }

    async fn shutdown(&self) {
        let mut state = self.state.lock().await;
        if let Some(conn) = state.conn.take() {
            close(conn).await;
        }
        state.shut_down = true;
    }
}

/// Closes a connection; for a child process, dropping the transport ends it (stdin closed, then
/// killed), and what is left of its process group is killed: a server that exits cleanly on EOF
/// would otherwise leave its helpers running.
async fn close(mut conn: Conn) {
    if let Err(e) = conn.service.close_with_timeout(Duration::from_secs(2)).await {
        tracing::debug!(error = %e, "MCP service task ended badly on close");
    }
    if let Some(pgid) = conn.pid {
        kill_group(pgid);
    }
}

#[cfg(unix)]
fn kill_group(pgid: u32) {
    use nix::sys::signal::{killpg, Signal};
    // ESRCH (the group is already gone) is the usual, good case.
    if let Ok(pgid) = i32::try_from(pgid) {
        let _ = killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

#[cfg(not(unix))]
fn kill_group(_pgid: u32) {}

/// The child's stderr goes to the log, line by line (MCP servers log there; stdout is the protocol).
async fn log_stderr(server: String, stderr: tokio::process::ChildStderr) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(server = %server, "stderr: {line}");
    }
}

/// Marks the server for restart if the call is dropped before it finishes (the tool loop's own
/// timeout aborted it): the server may still be busy with it, or wedged.
struct AbandonGuard {
    server: Option<Arc<Server>>,
    generation: u64,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.mark_broken(self.generation, "a call was abandoned");
        }
    }
}

/// One MCP tool, exposed under `prefix` + its name.
pub struct McpTool {
    def: ToolDef,
    /// The name the server knows it by (without the prefix).
    remote_name: String,
    server: Arc<Server>,
}

impl Tool for McpTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        let server = self.server.clone();
        let remote = self.remote_name.clone();
        async move { call_tool(server, remote, args).await }.boxed()
    }

    fn server(&self) -> Option<&str> {
        Some(&self.server.name)
    }
}

async fn call_tool(server: Arc<Server>, remote: String, args: Value) -> Result<String, ToolError> {
    let fail = |reason: String| ToolError::Failed(format!("MCP server {:?}: {reason}", server.name));
    let arguments = match args {
        Value::Object(map) => map,
        Value::Null => Default::default(),
        other => return Err(fail(format!("arguments must be a JSON object, got {other}"))),
    };
    let (peer, generation) = server.peer().await.map_err(&fail)?;
    let mut guard = AbandonGuard { server: Some(server.clone()), generation };
    let params = CallToolRequestParams::new(remote.clone()).with_arguments(arguments);
    let timeout = server.config.timeout();
    let outcome = tokio::time::timeout(timeout, peer.call_tool(params)).await;
    guard.server = None;
    match outcome {
        Ok(Ok(result)) => result_text(result),
        // The server answered with a JSON-RPC error (unknown tool, bad params): it is healthy.
        Ok(Err(ServiceError::McpError(e))) => Err(fail(format!("{remote}: {}", e.message))),
        Ok(Err(e)) => {
            server.mark_broken(generation, &e.to_string());
            Err(fail(format!("{remote} failed: {e} (the server is restarted before the next call)")))
        }
        Err(_) => {
            server.mark_broken(generation, "a call timed out");
            let after = human_duration(timeout);
            Err(fail(format!("{remote} timed out after {after} (the server is restarted before the next call)")))
        }
    }
}

/// MCP content joined as text; `isError` makes the whole result an error the model reads.
fn result_text(result: CallToolResult) -> Result<String, ToolError> {
    let mut parts: Vec<String> = result
        .content
        .iter()
        .map(|block| serde_json::to_value(block).map(|v| describe_content(&v)).unwrap_or_else(|e| format!("[{e}]")))
        .collect();
    if parts.is_empty() {
        if let Some(structured) = &result.structured_content {
            parts.push(structured.to_string());
        }
    }
    let text = parts.join("\n");
    if result.is_error == Some(true) {
        Err(ToolError::Failed(text))
    } else {
        Ok(text)
    }
}

/// One content item as text; binary items are described, not inlined (a model cannot read base64).
pub fn describe_content(item: &Value) -> String {
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = str_of(item, "type");
    match kind.as_str() {
        "text" => str_of(item, "text"),
        "image" | "audio" => {
            let bytes = base64_len(&str_of(item, "data"));
            format!("[{kind}: {bytes} bytes {}]", str_of(item, "mimeType"))
        }
        "resource" => {
            let res = item.get("resource").cloned().unwrap_or_default();
            match res.get("text").and_then(Value::as_str) {
                Some(text) => text.to_string(),
                None => format!(
                    "[resource {}: {} bytes {}]",
                    str_of(&res, "uri"),
                    base64_len(&str_of(&res, "blob")),
                    str_of(&res, "mimeType")
                ),
            }
        }
        "resource_link" => format!("[resource link: {} {}]", str_of(item, "uri"), str_of(item, "name")),
        other => format!("[{other} content]"),
    }
}

/// Decoded size of a base64 string, without decoding it.
fn base64_len(data: &str) -> usize {
    let padding = data.bytes().rev().take_while(|&b| b == b'=').count();
    (data.len() / 4 * 3).saturating_sub(padding)
}

/// `prefix` + the MCP name, with characters our names refuse (MCP allows `.` and `/`) turned into
/// `_`: the tool stays callable; the server still gets its own name.
fn exposed_name(server: &str, prefix: Option<&str>, name: &str) -> Result<String, ToolError> {
    let raw = format!("{}{name}", prefix.unwrap_or_default());
    let exposed: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    check_tool_name(&exposed).map_err(|e| ToolError::Mcp { server: server.into(), reason: e.to_string() })?;
    if exposed != raw {
        tracing::info!(server, tool = name, exposed = %exposed, "MCP tool renamed");
    }
    Ok(exposed)
}

/// Every configured server, connected, and its tools.
pub struct McpManager {
    servers: Vec<Arc<Server>>,
    tools: Vec<Arc<dyn Tool>>,
}

impl McpManager {
    /// Connects every server and lists its tools. Fails (after closing what it opened) when a
    /// server cannot start, a tool name is invalid, or two servers expose one name.
    pub async fn start(config: McpConfig) -> Result<McpManager, ToolError> {
        let http = super::http::build_client(reqwest::Client::builder())?;
        let mut manager = McpManager { servers: Vec::new(), tools: Vec::new() };
        let result = manager.connect_all(config, http).await;
        if let Err(e) = result {
            manager.shutdown().await;
            return Err(e);
        }
        Ok(manager)
    }

    async fn connect_all(&mut self, config: McpConfig, http: reqwest::Client) -> Result<(), ToolError> {
        for (name, server_config) in config.servers {
            server_config.validate(&name)?;
            let state = Default::default();
            let suspect = AtomicU64::new(0);
            self.servers.push(Arc::new(Server { name, config: server_config, http: http.clone(), state, suspect }));
        }
        // Servers start concurrently (an `npx` server alone takes seconds); names are checked after,
        // in config order, so the error for a clash is the same on every run.
        let listed = futures_util::future::join_all(self.servers.iter().map(|s| s.list_tools())).await;
        let mut owner: HashMap<String, String> = HashMap::new();
        for (server, tools) in self.servers.iter().zip(listed) {
            for tool in tools? {
                let exposed = exposed_name(&server.name, server.config.prefix.as_deref(), &tool.name)?;
                if let Some(first) = owner.insert(exposed.clone(), server.name.clone()) {
                    let reason = format!(
                        "tool {exposed:?} is exposed by both {first:?} and {:?}; set a prefix on one",
                        server.name
                    );
                    return Err(ToolError::Mcp { server: server.name.clone(), reason });
                }
                let def = ToolDef {
                    name: exposed,
                    // The title when a server gives no description: the model needs some hint.
                    description: tool.description.as_deref().or(tool.title.as_deref()).unwrap_or_default().to_string(),
                    parameters: Value::Object((*tool.input_schema).clone()),
                };
                let remote_name = tool.name.to_string();
                self.tools.push(Arc::new(McpTool { def, remote_name, server: server.clone() }));
            }
        }
        Ok(())
    }

    /// All tools of all servers, in config order (servers by name, tools as each lists them).
    pub fn tools(&self) -> &[Arc<dyn Tool>] {
        &self.tools
    }

    /// The process id of a stdio server's current child (None for HTTP servers or when down).
    pub async fn server_pid(&self, server: &str) -> Option<u32> {
        let server = self.servers.iter().find(|s| s.name == server)?;
        server.state.lock().await.conn.as_ref().and_then(|c| c.pid)
    }

    /// Closes every connection (stdio children are killed). Tools still held fail afterwards.
    pub async fn shutdown(&self) {
        for server in &self.servers {
            server.shutdown().await;
        }
    }
}

impl std::fmt::Debug for McpManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<&str> = self.servers.iter().map(|s| s.name.as_str()).collect();
        let tools: Vec<&str> = self.tools.iter().map(|t| t.def().name.as_str()).collect();
        f.debug_struct("McpManager").field("servers", &servers).field("tools", &tools).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config() {
        let config = McpConfig::from_toml(
            r#"
            [servers.time]
            command = "python3"
            args = ["-m", "mcp_server_time"]
            env = { PYTHONPATH = "/x" }
            timeout_secs = 5
            prefix = "time_"

            [servers.web]
            url = "http://127.0.0.1:3001/mcp"
            "#,
        )
        .unwrap();
        let time = &config.servers["time"];
        assert_eq!(
            (time.command.as_deref(), time.args.len(), time.timeout()),
            (Some("python3"), 2, Duration::from_secs(5))
        );
        assert_eq!(config.servers["web"].timeout(), DEFAULT_TIMEOUT);
        for bad in [
            "[servers.a]\ncommand = \"x\"\nurl = \"http://h/\"",
            "[servers.a]\nargs = [\"x\"]",
            "[servers.a]\nurl = \"http://h/\"\nargs = [\"x\"]",
            "[servers.a]\nurl = \"ftp://h/\"",
            "[servers.a]\ncommand = \"x\"\ntimeout_secs = 0",
            "[servers.a]\ncommand = \"x\"\nunknown = 1",
        ] {
            assert!(McpConfig::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn content() {
        assert_eq!(describe_content(&json!({"type": "text", "text": "hi"})), "hi");
        let image = json!({"type": "image", "data": "aGVsbG8=", "mimeType": "image/png"});
        assert_eq!(describe_content(&image), "[image: 5 bytes image/png]");
        let res = json!({"type": "resource", "resource": {"uri": "file:///a", "text": "body"}});
        assert_eq!(describe_content(&res), "body");
        let blob = json!({"type": "resource", "resource": {"uri": "file:///b", "blob": "AAAA", "mimeType": "x/y"}});
        assert_eq!(describe_content(&blob), "[resource file:///b: 3 bytes x/y]");
        assert_eq!(base64_len(""), 0);
        assert_eq!(base64_len("aGk="), 2);
    }

    #[test]
    fn exposed_names() {
        assert_eq!(exposed_name("s", None, "get_time").unwrap(), "get_time");
        assert_eq!(exposed_name("s", Some("gh_"), "repos/list.all").unwrap(), "gh_repos_list_all");
        let err = exposed_name("s", Some("p_"), &"x".repeat(63)).unwrap_err().to_string();
        assert!(err.contains("\"s\"") && err.contains("invalid tool name"), "{err}");
    }
}
