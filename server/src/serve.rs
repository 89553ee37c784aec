//! `kiln serve`: binds first (so `/health` answers 503 while the model loads), loads and warms
//! the engine on a blocking thread, then serves until SIGINT/SIGTERM. Shutdown (drain): new
//! requests get 503 (`/health` too: connections are still accepted), requests in flight finish
//! within `--shutdown-timeout`, then what is left is cancelled and the process exits 0. A request
//! still sending its head or body is not in flight and does not hold the exit.

use crate::api::access::AccessPolicy;
use crate::api::audit::AuditLog;
use crate::api::auth::AuthArgs;
use crate::api::ratelimit::RateLimitArgs;
use crate::api::{metrics_router, router, AppState};
use crate::engine_args::EngineArgs;
use crate::http::{self, HttpArgs};
use anyhow::{Context, Result};
use clap::Args;
use kiln_inference::engine::{EngineHandle, Prompt};
use kiln_inference::SamplingParams;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Name clients use in `model` (default: the model file or directory name).
    #[arg(long, env = "KILN_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1", env = "KILN_HOST")]
    pub host: String,
    #[arg(long, default_value_t = 8080, env = "KILN_PORT")]
    pub port: u16,
    /// Also serve `/metrics` and `/health`, with no credential, on this port of `--host` (for
    /// Prometheus and Kubernetes endpoint pickers; keep it off the public network).
    #[arg(long, env = "KILN_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30, env = "KILN_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: u64,
    /// An embedding model (sentence-transformers directory or Hugging Face id) served beside the
    /// chat model on /v1/embeddings.
    #[arg(long, env = "KILN_EMBEDDING_MODEL")]
    pub embedding_model: Option<String>,
    /// Name clients use for the embedding model (default: its directory name).
    #[arg(long, env = "KILN_SERVED_EMBEDDING_MODEL_NAME")]
    pub served_embedding_model_name: Option<String>,
    /// Host names accepted besides loopback ones (repeatable or comma-separated; `*` = any).
    /// Without an API key only loopback names pass unless listed here (stops DNS rebinding);
    /// with a key, `Host` is checked only when this is set.
    #[arg(long = "allowed-hosts", env = "KILN_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`https://app.example.com`) allowed to call kiln, with CORS headers
    /// (repeatable or comma-separated; `*` = any). None: CORS is off, and without an API key
    /// only loopback origins may send requests.
    #[arg(long = "allowed-origins", env = "KILN_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub rate_limits: RateLimitArgs,
    #[command(flatten)]
    pub agents: crate::agents::AgentArgs,
    /// Write refused requests (401, 403, rate-limited 429) and admin actions (agent, memory and
    /// run changes) as JSON lines to this file (`-`: stdout). Off by default.
    #[arg(long, env = "KILN_AUDIT_LOG")]
    pub audit_log: Option<String>,
    /// A TOML file with any of these settings (see `config.rs`); read before parsing.
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<String>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(a))
}

async fn serve(a: ServeArgs) -> Result<()> {
    let name = a.served_model_name.clone().unwrap_or_else(|| default_name(&a.engine.model));
    let access = AccessPolicy { allowed_hosts: a.allowed_hosts.clone(), allowed_origins: a.allowed_origins.clone() };
    let auth = a.auth.build()?;
    let auth_on = auth.enabled();
    let mut state = AppState::new(name.clone(), Vec::new(), fingerprint(&a)?)
        .with_auth(auth)
        .with_access(access)
        .with_body_timeout(Duration::from_secs(a.http.body_timeout.max(1)))
        .with_rate_limits(a.rate_limits.limits());
    if let Some(path) = &a.audit_log {
        state = state.with_audit_log(AuditLog::open(path).with_context(|| format!("opening audit log {path}"))?);
    }
    let state = Arc::new(state);
    let addr = format!("{}:{}", a.host, a.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let base = format!("http://{local}/v1");
    tracing::info!(%base, model = %name, "listening; loading the model");
    if !local.ip().is_loopback() && !auth_on && a.allowed_hosts.is_empty() {
        tracing::warn!(
            "no --api-key, keys file or JWT and no --allowed-hosts: only requests naming a loopback Host (localhost, 127.0.0.1) \
             are answered; add --allowed-hosts NAME (or '*') for clients that reach this address by name or IP"
        );
    }
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let metrics_server = match a.metrics_port {
        Some(port) => {
            let addr = format!("{}:{port}", a.host);
            let l = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
            tracing::info!(addr = %l.local_addr()?, "serving /metrics and /health without credentials");
            let app = metrics_router(state.clone());
            Some(tokio::spawn(http::serve(l, app, a.http.limits(), drain_rx.clone())))
        }
        None => None,
    };
    let server = tokio::spawn(http::serve(listener, router(state.clone()), a.http.limits(), drain_rx));
    let engine_args = a.engine.clone();
    let (embed_model, embed_name) = (a.embedding_model.clone(), a.served_embedding_model_name.clone());
    let (embed_state, sampling_state) = (state.clone(), state.clone());
    let defaults_out = std::sync::Arc::new(std::sync::OnceLock::new());
    let defaults_in = defaults_out.clone();
    let loading = tokio::task::spawn_blocking(move || -> Result<EngineHandle> {
        if let Some(path) = embed_model {
            let h = kiln_inference::embed::start_embedder(&path, &kiln_inference::embed::EmbedConfig::default())
                .with_context(|| format!("loading embedding model '{path}'"))?;
            h.embed(vec![kiln_inference::embed::EmbedInput::Text("warm-up".into())], &Default::default())?;
            embed_state.set_embedder(embed_name.unwrap_or_else(|| default_name(&path)), h);
        }
        let engine = engine_args.start()?;
        let defaults = engine_args.sampling_defaults(engine.sampling_defaults);
        tracing::info!(?defaults, "default sampling for fields requests leave out");
        sampling_state.set_sampling_defaults(defaults);
        let _ = defaults_in.set(defaults);
        warm_up(&engine.handle)?;
        Ok(engine.handle)
    });
    let handle = tokio::select! {
        r = loading => r.context("model loading task")??,
        _ = shutdown_signal() => { server.abort(); return Ok(()); }
    };
    let defaults = defaults_out.get().copied().unwrap_or_default();
    let memory = match state.embedder_if_loaded() {
        Some((_, embedder)) => Some(crate::agents::start_memory(&a.agents, embedder.clone()).await?),
        None => None,
    };
    let agents = crate::agents::start(&a.agents, handle.clone(), name.clone(), defaults, memory.clone()).await?;
    state.set_agents(agents.runtime.clone());
    if let Some(m) = memory {
        state.set_memory(m);
    }
    state.set_engine(handle.clone());
    println!("kiln: serving {base} (model \"{name}\"); OpenAI SDK: base_url=\"{base}\"");
    tracing::info!(%base, "ready");
    shutdown_signal().await;
    tracing::info!(timeout_secs = a.shutdown_timeout, "shutting down: no new requests, finishing in-flight ones");
    state.begin_shutdown();
    let _ = drain_tx.send(true);
    let deadline = Instant::now() + Duration::from_secs(a.shutdown_timeout);
    if !until_idle(&state, deadline).await {
        tracing::warn!("shutdown deadline passed: cancelling in-flight requests");
        handle.shutdown();
        // Cancelled streams end at once; this only lets their last events out.
        until_idle(&state, Instant::now() + Duration::from_secs(2)).await;
    }
    // The last response bodies are done; give their final bytes a moment to leave the socket.
    tokio::time::sleep(Duration::from_millis(250)).await;
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    if let Some(mcp) = &agents.mcp {
        mcp.shutdown().await;
    }
    handle.shutdown();
    Ok(())
}

/// Waits until no request is in flight or `deadline` passes; true if idle.
async fn until_idle(state: &AppState, deadline: Instant) -> bool {
    while state.requests_in_flight() > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// One short greedy generation: first touches of weights, caches and kernels happen before
/// `/health` says ready.
fn warm_up(h: &EngineHandle) -> Result<()> {
    let params = SamplingParams { temperature: 0.0, max_tokens: Some(2), ..SamplingParams::default() };
    let mut s = h.generate(Prompt::Text("Hello".into()), params)?;
    while let Some(d) = s.blocking_next() {
        d?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// `smollm2-135m-instruct-q4_1.gguf` -> `smollm2-135m-instruct-q4_1`; a directory -> its name.
pub fn default_name(model: &str) -> String {
    let p = std::path::Path::new(model.trim_end_matches('/'));
    let stem = if p.extension().is_some_and(|e| e == "gguf") { p.file_stem() } else { p.file_name() };
    stem.and_then(|s| s.to_str()).map_or_else(|| model.to_string(), str::to_string)
}

/// Stable for one build, model and engine configuration (OpenAI's `system_fingerprint`).
fn fingerprint(a: &ServeArgs) -> Result<String> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut h);
    a.engine.model.hash(&mut h);
    format!("{:?}", a.engine.config()?).hash(&mut h);
    Ok(format!("fp_{:012x}", h.finish() & 0xffff_ffff_ffff))
}
