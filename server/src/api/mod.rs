//! The HTTP API: OpenAI-compatible routes plus health, metrics and tokenization, on axum.
//! Owns request ids, access control (`access.rs`: credentials in `auth.rs` and `jwt.rs`, the
//! scope each route needs in `scopes.rs`), body admission (`guard.rs`), panic isolation
//! and the OpenAI error shape for every failure (including unknown routes and malformed bodies).
//! Talks to the engine only through its `EngineHandle`.

pub mod access;
mod agents;
pub mod audit;
pub mod auth;
pub mod chat;
mod chat_json;
pub mod completions;
mod embeddings;
pub mod error;
mod files;
mod generation;
mod guard;
pub mod jwt;
mod logprobs;
mod memory;
mod misc;
mod multipart;
mod openapi;
mod openapi_shapes;
pub mod ratelimit;
pub mod request;
mod response_format;
mod responses;
mod responses_agent;
mod responses_agent_sse;
mod responses_file_search;
mod responses_items;
mod responses_sse;
pub mod responses_store;
pub mod scopes;
mod sse;
mod vector_stores;

use crate::metrics::Metrics;
use access::AccessPolicy;
use audit::AuditLog;
use auth::Auth;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::{ApiError, ApiResult};
use kiln_inference::embed::EmbedHandle;
use kiln_inference::engine::EngineHandle;
use kiln_inference::SamplingDefaults;
use ratelimit::{RateLimiter, RateLimits};
use responses_store::Responses;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Everything the handlers share. The engine appears once the model is loaded and warmed.
pub struct AppState {
    engine: OnceLock<EngineHandle>,
    /// The agent layer, started after the engine (absent in servers built without it).
    agents: OnceLock<kiln_agent::AgentRuntime>,
    /// The embedding model served beside the chat model, if configured, and its name.
    embedder: OnceLock<(String, EmbedHandle)>,
    /// Agent memory (needs the embedding model; absent without it).
    memory: OnceLock<kiln_agent::memory::MemoryStore>,
    pub served_model_name: String,
    /// Configured credentials (see `auth.rs`; none: auth off).
    pub auth: Auth,
    /// Stable per build + model + engine config.
    pub system_fingerprint: String,
    /// Unix seconds when the server started (the model's `created`).
    pub created: u64,
    pub metrics: Metrics,
    /// Sampling fields a request leaves out are taken from here (none until set).
    sampling_defaults: OnceLock<SamplingDefaults>,
    shutting_down: AtomicBool,
    /// Host / Origin allowlists (see `access.rs`).
    pub access: AccessPolicy,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Requests whose body is in and whose response is not finished (the drain waits for them).
    pub in_flight: AtomicUsize,
    /// Slots for CPU-heavy request work on the blocking pool (see [`AppState::cpu`]).
    cpu_slots: Arc<Semaphore>,
    /// Requests and tokens per period, per tier (see `ratelimit.rs`; off by default).
    pub rate_limits: Arc<RateLimiter>,
    /// Where refusals are recorded (see `audit.rs`; off by default).
    pub audit: Option<AuditLog>,
    /// Stored Responses API turns and their parked sessions (see `responses_store.rs`).
    pub responses: Responses,
}

impl AppState {
    /// A state whose `api_keys` (if any) hold every scope; see [`AppState::with_auth`].
    pub fn new(served_model_name: String, api_keys: Vec<String>, system_fingerprint: String) -> Self {
        let created = generation::unix_now();
        Self {
            engine: OnceLock::new(),
            agents: OnceLock::new(),
            embedder: OnceLock::new(),
            memory: OnceLock::new(),
            metrics: Metrics::new(&served_model_name),
            served_model_name,
            auth: Auth::from_keys(api_keys),
            system_fingerprint,
            created,
            sampling_defaults: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            access: AccessPolicy::default(),
            body_timeout: Duration::from_secs(60),
            in_flight: AtomicUsize::new(0),
            cpu_slots: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))),
            rate_limits: Arc::new(RateLimiter::new(RateLimits::default())),
            audit: None,
            responses: Responses::default(),
        }
    }

    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = Arc::new(RateLimiter::new(limits));
        self
    }

    /// With these credentials instead of the keys given to `new`.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    pub fn with_audit_log(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// Runs CPU-heavy request work (tokenizing, rendering a chat template) on the blocking pool,
    /// at most one job per core at once, so the async workers stay free to answer everyone else
    /// (`/health` included) however large the input. A waiting client that goes away frees its
    /// place; a started job runs to its end.
    pub async fn cpu<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
        let slot = self.cpu_slots.clone().acquire_owned().await.map_err(|_| ApiError::unavailable("shutting down"))?;
        // The request's span follows the work, so the engine's log lines carry its id.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let (_slot, _span) = (slot, span.enter());
            f()
        })
        .await
        .map_err(|e| ApiError::internal(format!("a tokenizer task failed: {e}")))
    }

    /// With these Host / Origin allowlists instead of none (loopback only without an API key).
    pub fn with_access(mut self, access: AccessPolicy) -> Self {
        self.access = access;
        self
    }

    pub fn with_body_timeout(mut self, t: Duration) -> Self {
        self.body_timeout = t;
        self
    }

    /// Requests being answered right now (streams until their last event).
    pub fn requests_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Publishes the loaded, warmed engine: from now on `/health` is 200.
    pub fn set_engine(&self, h: EngineHandle) {
        let _ = self.engine.set(h);
    }

    /// The defaults for sampling fields requests leave out (set before `set_engine`).
    pub fn set_sampling_defaults(&self, d: SamplingDefaults) {
        let _ = self.sampling_defaults.set(d);
    }

    pub fn sampling_defaults(&self) -> SamplingDefaults {
        self.sampling_defaults.get().copied().unwrap_or_default()
    }

    /// Publishes the embedding model under `name` (before `set_engine`, so `/health` covers it).
    pub fn set_embedder(&self, name: String, h: EmbedHandle) {
        let _ = self.embedder.set((name, h));
    }

    pub fn embedder_if_loaded(&self) -> Option<&(String, EmbedHandle)> {
        self.embedder.get()
    }

    /// The embedding model called `model`: 404 for an unknown name, 400 for the chat model.
    pub fn embedder(&self, model: &str) -> ApiResult<&EmbedHandle> {
        self.engine()?;
        match self.embedder.get() {
            Some((name, h)) if name == model => Ok(h),
            _ if model == self.served_model_name => {
                Err(ApiError::invalid("model", format!("'{model}' is a chat model; it does not serve embeddings")))
            }
            _ => Err(ApiError::model_not_found(model)),
        }
    }

    /// Starts serving the agent API; stored Responses go to its run store from now on.
    pub fn set_agents(&self, rt: kiln_agent::AgentRuntime) {
        self.responses.set_durable(Arc::new(responses_store::SqlStore(rt.store().clone())));
        let _ = self.agents.set(rt);
    }

    pub fn agents(&self) -> Option<&kiln_agent::AgentRuntime> {
        self.agents.get()
    }

    pub fn set_memory(&self, m: kiln_agent::memory::MemoryStore) {
        let _ = self.memory.set(m);
    }

    pub fn memory(&self) -> Option<&kiln_agent::memory::MemoryStore> {
        self.memory.get()
    }

    pub fn engine_if_loaded(&self) -> Option<&EngineHandle> {
        self.engine.get()
    }

    /// New requests get 503 from now on; in-flight ones continue.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The engine, or 503 while loading / shutting down.
    pub fn engine(&self) -> ApiResult<&EngineHandle> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.engine.get().ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))
    }

    /// 404 unless `model` names the served chat model (400 for the embedding model).
    pub fn check_model(&self, model: &str) -> ApiResult<()> {
        if model == self.served_model_name {
            Ok(())
        } else if self.embedder.get().is_some_and(|(name, _)| name == model) {
            Err(ApiError::invalid("model", format!("'{model}' is an embedding model; use /v1/embeddings")))
        } else {
            Err(ApiError::model_not_found(model))
        }
    }
}

pub type Shared = Arc<AppState>;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 8 << 20;

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/openapi.json", get(misc::openapi))
        .route("/v1/models", get(misc::list_models))
        .route("/v1/models/{id}", get(misc::get_model))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/embeddings", post(embeddings::handle))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::get).delete(responses::delete))
        .route("/v1/responses/{id}/input_items", get(responses::input_items))
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/metrics", get(misc::metrics))
        .route("/v1/agents", post(agents::create).get(agents::list))
        .route("/v1/agents/{name}", get(agents::get).patch(agents::patch).delete(agents::delete))
        .route("/v1/agents/{name}/runs", post(agents::start_run))
        .route("/v1/runs/{id}", get(agents::get_run))
        .route("/v1/runs/{id}/steps", get(agents::steps))
        .route("/v1/runs/{id}/cancel", post(agents::cancel))
        .route("/v1/runs/{id}/approve", post(agents::approve))
        .route("/v1/runs/{id}/reject", post(agents::reject))
        .route("/v1/runs/{id}/tool_outputs", post(agents::tool_outputs))
        .route("/v1/runs/{id}/events", get(agents::events_ws))
        // Memory (issue 12).
        .route("/v1/memory/{scope}", post(memory::add).get(memory::list).delete(memory::delete_scope))
        .route("/v1/memory/{scope}/search", post(memory::search))
        .route("/v1/memory/{scope}/{id}", get(memory::get).patch(memory::patch).delete(memory::delete))
        // Files and vector stores (issue 12: retrieval).
        .route("/v1/files", post(files::create).get(files::list))
        .route("/v1/files/{file_id}", get(files::get).delete(files::delete))
        .route("/v1/files/{file_id}/content", get(files::content))
        .route("/v1/vector_stores", post(vector_stores::create).get(vector_stores::list))
        .route(
            "/v1/vector_stores/{id}",
            get(vector_stores::get).post(vector_stores::update).delete(vector_stores::delete),
        )
        .route("/v1/vector_stores/{id}/files", post(vector_stores::attach).get(vector_stores::list_files))
        .route("/v1/vector_stores/{id}/files/{file_id}", get(vector_stores::get_file).delete(vector_stores::detach))
        .route("/v1/vector_stores/{id}/search", post(vector_stores::search))
        .route("/v1/vector_stores/{id}/file_batches", post(vector_stores::create_batch))
        .route("/v1/vector_stores/{id}/file_batches/{batch_id}", get(vector_stores::get_batch))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .route("/health", get(misc::health))
        // `method_not_allowed_fallback` covers only routes registered before it: set it here too.
        .method_not_allowed_fallback(method_not_allowed)
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Each layer wraps those above it: the gate (who may ask) runs before any body is read.
        .layer(middleware::from_fn_with_state(state.clone(), guard::body_guard))
        // Only admitted clients reach the buckets; refusals cost no body read.
        .layer(middleware::from_fn_with_state(state.clone(), ratelimit::limit))
        .layer(middleware::from_fn_with_state(state.clone(), access::gate))
        .layer(middleware::from_fn_with_state(state.clone(), audit::record))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .layer(middleware::map_response(error::openai_error_bodies))
        .layer(middleware::from_fn_with_state(state.clone(), request_id_and_count))
        .with_state(state)
}

/// The router of `--metrics-port`: `/metrics` and `/health` only, with no credential (the port is
/// the boundary: Kubernetes endpoint pickers and Prometheus scrape it from inside the cluster),
/// errors in OpenAI's shape like the main port's.
pub fn metrics_router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", get(misc::metrics))
        .route("/health", get(misc::health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .layer(middleware::map_response(error::openai_error_bodies))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("method {} is not allowed on {}", req.method(), req.uri().path()),
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("the request handler panicked; the server is still running").into_response()
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Echoes (or generates) `x-request-id` on every response, opens the request's tracing span
/// and counts the response status per route.
async fn request_id_and_count(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let route = route_label(req.uri().path());
    let span = tracing::info_span!("request", id = %id, method = %req.method(), route);
    req.extensions_mut().insert(audit::RequestId(id.clone()));
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    state.metrics.count_request(route, resp.status().as_u16());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    resp
}

/// A bounded set of labels (raw paths would let clients grow the metric without limit).
pub(crate) fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/models" => "/v1/models",
        "/v1/responses" => "/v1/responses",
        p if p.starts_with("/v1/responses/") => "/v1/responses/{id}",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    }
}
