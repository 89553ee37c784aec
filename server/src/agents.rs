//! `kiln serve`'s agent flags and the start of the agent runtime after the engine is up: the run
//! store (SQLite under `--data-dir`, or `--database-url`), tools (builtins, `--mcp-config`
//! servers, HTTP tools limited to `--http-tool-hosts`), agents from `--agents DIR`; and the memory
//! store (when an embedding model is served: qdrant-edge under `--data-dir/memory`, or a Qdrant
//! server with `--qdrant-url`).

use anyhow::{Context, Result};
use clap::Args;
use kiln_agent::cost::Prices;
use kiln_agent::memory::{MemoryStore, RemoteConfig};
use kiln_agent::spec::load_dir;
use kiln_agent::store::RunStore;
use kiln_agent::tools::mcp::{McpConfig, McpManager};
use kiln_agent::tools::{CallLimits, ToolRegistry};
use kiln_agent::{AgentRuntime, RuntimeConfig};
use kiln_inference::embed::EmbedHandle;
use kiln_inference::{EngineHandle, SamplingDefaults, SamplingParams};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Where kiln keeps what it persists (the SQLite run store). Default: $XDG_DATA_HOME/kiln or
    /// ~/.local/share/kiln.
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The run store in Postgres (`postgres://user:pass@host/db`) instead of SQLite; replicas
    /// sharing one database take over each other's runs.
    #[arg(long, env = "KILN_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A directory of agent definitions (`*.toml`), loaded (and stored) at start.
    #[arg(long, env = "KILN_AGENTS")]
    pub agents: Option<PathBuf>,
    /// MCP servers whose tools agents may use (TOML, `[servers.NAME]` with `command` or `url`).
    #[arg(long, env = "KILN_MCP_CONFIG")]
    pub mcp_config: Option<PathBuf>,
    /// Hosts agents' HTTP tools may call (repeatable or comma-separated; `host`, `host:port`,
    /// `*.domain`). None: HTTP tools are refused.
    #[arg(long = "http-tool-hosts", env = "KILN_HTTP_TOOL_HOSTS", value_delimiter = ',')]
    pub http_tool_hosts: Vec<String>,
    /// Seconds one tool call may take before the model gets a timeout error as its result.
    #[arg(long, default_value_t = 30, env = "KILN_TOOL_TIMEOUT")]
    pub tool_timeout: u64,
    /// Seconds a process's claim on a run lasts without renewal (another process takes over the
    /// run after that when this one dies).
    #[arg(long, default_value_t = 30, env = "KILN_RUN_LEASE_SECS")]
    pub run_lease_secs: u64,
    /// Days a stored Responses API response is kept (OpenAI keeps them 30 days); 0 keeps them
    /// until deleted.
    #[arg(long, default_value_t = 30, env = "KILN_RESPONSES_RETENTION_DAYS")]
    pub responses_retention_days: u64,
    /// Keep agent memory in a Qdrant server or cluster at this gRPC URL (`http://host:6334`,
    /// `https://` for TLS) instead of the embedded store under `--data-dir/memory`. A server that
    /// does not answer at start does not stop kiln: memory routes answer 503 until it does.
    #[arg(long, env = "KILN_QDRANT_URL")]
    pub qdrant_url: Option<String>,
    /// Seconds one Qdrant request may take before memory answers 503 (connecting may take 3 more).
    #[arg(long, default_value_t = 10, env = "KILN_QDRANT_TIMEOUT")]
    pub qdrant_timeout: u64,
    /// The Qdrant API key (prefer the `QDRANT_API_KEY` variable to the flag: `ps` shows flags).
    #[arg(long, env = "QDRANT_API_KEY", hide_env_values = true)]
    pub qdrant_api_key: Option<Secret>,
    /// The Qdrant collection holding this kiln's memories (created on first use).
    #[arg(long, env = "KILN_QDRANT_COLLECTION", default_value = RemoteConfig::DEFAULT_COLLECTION)]
    pub qdrant_collection: String,
    /// USD per million prompt tokens, for the `cost` of agent runs (unset: cost is null).
    #[arg(long, env = "KILN_PRICE_INPUT", requires = "price_output")]
    pub price_input: Option<f64>,
    /// USD per million prompt tokens served from cached K/V (default: the input price).
    #[arg(long, env = "KILN_PRICE_CACHED_INPUT", requires = "price_input")]
    pub price_cached_input: Option<f64>,
    /// USD per million generated tokens.
    #[arg(long, env = "KILN_PRICE_OUTPUT", requires = "price_input")]
    pub price_output: Option<f64>,
}

/// A credential from a flag or the environment; a debug print of the flags never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for AgentArgs {
    /// What `kiln serve` gets with no agent flag (the `KILN_*` variables still apply).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            agents: AgentArgs,
        }
        <Only as clap::Parser>::parse_from(["kiln"]).agents
    }
}

impl AgentArgs {
    fn data_dir(&self) -> Result<PathBuf> {
        let dir = match &self.data_dir {
            Some(d) => d.clone(),
            None => default_data_dir()?,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating data dir {}", dir.display()))?;
        Ok(dir)
    }

    /// The price list, when `--price-input` and `--price-output` are both set.
    fn prices(&self) -> Result<Option<Prices>> {
        let (Some(input), Some(output)) = (self.price_input, self.price_output) else { return Ok(None) };
        let cached_input = self.price_cached_input.unwrap_or(input);
        if [input, output, cached_input].iter().any(|p| !p.is_finite() || *p < 0.0) {
            anyhow::bail!("--price-* must be finite and >= 0 (USD per million tokens)");
        }
        Ok(Some(Prices { input, cached_input, output }))
    }

    fn store_url(&self) -> Result<String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        Ok(format!("sqlite://{}", self.data_dir()?.join("kiln.db").display()))
    }
}

/// How often stored responses past their retention are deleted.
const RESPONSES_PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Deletes stored responses older than `days` every hour (from now, then hourly).
fn prune_responses(store: RunStore, days: u64) {
    if days == 0 {
        return;
    }
    let keep_ms = i64::try_from(days.saturating_mul(86_400_000)).unwrap_or(i64::MAX);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RESPONSES_PRUNE_EVERY);
        loop {
            tick.tick().await;
            match store.prune_responses(kiln_agent::store::now_ms().saturating_sub(keep_ms)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "stored responses past their retention deleted"),
                Err(e) => tracing::warn!(error = %e, "pruning stored responses failed"),
            }
        }
    });
}

/// How often expired memories are deleted (readers never see them in between).
const MEMORY_PURGE_EVERY: Duration = Duration::from_secs(60);

/// Opens the memory store for `embedder`'s vectors (embedded under `--data-dir/memory`, or the
/// `--qdrant-url` server's collection), and starts its periodic TTL purge. An unreachable Qdrant
/// is not a start-up error (memory answers 503 and recovers when it answers: the rest of kiln
/// need not wait for it); a collection of another shape, or a bad URL, is.
pub async fn start_memory(a: &AgentArgs, embedder: EmbedHandle) -> Result<MemoryStore> {
    let store = match &a.qdrant_url {
        Some(url) => {
            let mut config = RemoteConfig::new(url.clone());
            config.collection = a.qdrant_collection.clone();
            config.request_timeout = Duration::from_secs(a.qdrant_timeout.max(1));
            config.api_key = a.qdrant_api_key.as_ref().map(|k| k.0.clone()).filter(|k| !k.is_empty());
            let store = MemoryStore::open_remote(config, embedder)
                .await
                .with_context(|| format!("opening memory collection `{}` on Qdrant at {url}", a.qdrant_collection))?;
            tracing::info!(url = %url, collection = %a.qdrant_collection, "memory store: Qdrant server");
            store
        }
        None => {
            let dir = a.data_dir()?.join("memory");
            let store = MemoryStore::open_embedded(&dir, embedder)
                .await
                .with_context(|| format!("opening the memory store in {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "memory store: embedded");
            store
        }
    };
    let purger = store.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MEMORY_PURGE_EVERY);
        loop {
            tick.tick().await;
            if let Err(e) = purger.purge_expired().await {
                tracing::warn!(error = %e, "memory TTL purge failed");
            }
        }
    });
    Ok(store)
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(d).join("kiln"));
    }
    let home = std::env::var_os("HOME").context("no --data-dir and no HOME to put it under")?;
    Ok(PathBuf::from(home).join(".local/share/kiln"))
}

/// The running agent layer; `mcp` stays open as long as the runtime serves.
pub struct Agents {
    pub runtime: AgentRuntime,
    pub mcp: Option<McpManager>,
}

/// Opens the store, starts MCP servers, loads agents and starts the runtime.
/// `memory` backs the agents' memory tools (none: agents listing them are refused).
pub async fn start(
    a: &AgentArgs,
    engine: EngineHandle,
    model: String,
    defaults: SamplingDefaults,
    memory: Option<MemoryStore>,
) -> Result<Agents> {
    let url = a.store_url()?;
    let store = RunStore::open(&url).await.with_context(|| format!("opening the run store {}", redact(&url)))?;
    let mut registry = ToolRegistry::with_builtins();
    let mcp = match &a.mcp_config {
        Some(path) => {
            let manager = McpManager::start(McpConfig::load(path)?).await?;
            for tool in manager.tools() {
                registry.insert(tool.clone())?;
            }
            Some(manager)
        }
        None => None,
    };
    let mut config = RuntimeConfig::new(vec![model]);
    config.lease_ttl = Duration::from_secs(a.run_lease_secs.max(1));
    config.claim_interval = (config.lease_ttl / 3).max(Duration::from_millis(500));
    config.call_limits = CallLimits { timeout: Duration::from_secs(a.tool_timeout.max(1)), ..CallLimits::default() };
    config.sampling = sampling(defaults);
    config.http_hosts = a.http_tool_hosts.clone();
    config.prices = a.prices()?;
    config.memory = memory;
    prune_responses(store.clone(), a.responses_retention_days);
    let runtime = AgentRuntime::start(engine, store, registry, config)?;
    if let Some(dir) = &a.agents {
        let specs = load_dir(dir).map_err(|e| anyhow::anyhow!("agents in {}: {e}", dir.display()))?;
        for spec in specs {
            let name = spec.name.clone();
            runtime.put_agent(spec).await.with_context(|| format!("agent '{name}' in {}", dir.display()))?;
        }
    }
    Ok(Agents { runtime, mcp })
}

/// The served model's defaults as the base of every agent turn.
fn sampling(d: SamplingDefaults) -> SamplingParams {
    let base = SamplingParams::default();
    SamplingParams {
        temperature: d.temperature.unwrap_or(base.temperature),
        top_p: d.top_p.unwrap_or(base.top_p),
        top_k: d.top_k.unwrap_or(base.top_k),
        min_p: d.min_p.unwrap_or(base.min_p),
        repetition_penalty: d.repetition_penalty.unwrap_or(base.repetition_penalty),
        ..base
    }
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}
