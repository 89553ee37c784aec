//! Multi-tier rate limits: a global tier, a per-caller tier (one bucket pair per API key subject
//! or JWT `sub`, the [`Principal`]'s subject) and an anonymous tier (with auth off, every
//! request shares it), each with requests and tokens per period (60 s by
//! default: requests/min and tokens/min). Every limit is a token bucket holding `limit` and
//! refilled continuously at `limit / period`, so a burst gets exactly `limit` and then one more
//! per `period / limit`. All off unless a limit is set.
//!
//! The token rule: a request is admitted when every bucket that applies to it holds at least one
//! request and at least one token; tokens are then charged as they become known, the prompt's
//! tokens when the engine accepts it and the generated ones when the request ends (finished,
//! failed or abandoned); embeddings charge their input tokens. Nothing is estimated, so a request
//! can take a bucket below zero: that debt delays the next admission by the time it takes to
//! refill. Refusals are 429 with `Retry-After` and the `x-ratelimit-*` headers OpenAI sends (also
//! on admitted responses, describing the tightest bucket of each kind).
//!
//! Owns: the buckets, admission, the headers and the per-request token charge. Must not: check
//! credentials (`access.rs` runs first; an unknown key or a bad token never gets a bucket) or
//! read bodies.

use super::auth::{Principal, Via};
use super::error::ApiError;
use super::Shared;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Args;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `kiln serve` rate-limit flags; 0 (the default) means no limit for that tier and kind.
#[derive(Args, Debug, Clone, Default)]
pub struct RateLimitArgs {
    /// Requests per period for the whole server.
    #[arg(long, default_value_t = 0, env = "KILN_RATE_LIMIT_GLOBAL_RPM")]
    pub rate_limit_global_rpm: u64,
    /// Tokens (prompt + generated) per period for the whole server.
    #[arg(long, default_value_t = 0, env = "KILN_RATE_LIMIT_GLOBAL_TPM")]
    pub rate_limit_global_tpm: u64,
    /// Requests per period for each caller (API key subject or JWT `sub`).
    #[arg(long, default_value_t = 0, env = "KILN_RATE_LIMIT_KEY_RPM")]
    pub rate_limit_key_rpm: u64,
    /// Tokens per period for each caller (API key subject or JWT `sub`).
    #[arg(long, default_value_t = 0, env = "KILN_RATE_LIMIT_KEY_TPM")]
    pub rate_limit_key_tpm: u64,
    /// Requests per period shared by all requests when auth is off (no key or JWT configured).
    #[arg(long, default_value_t = 0, env = "KILN_RATE_LIMIT_ANONYMOUS_RPM")]
    pub rate_limit_anonymous_rpm: u64,
    /// Tokens per period shared by all requests when auth is off.
    #[arg(long, default_value_t = 0, env = "KILN_RATE_LIMIT_ANONYMOUS_TPM")]
    pub rate_limit_anonymous_tpm: u64,
    /// Seconds the limits above are counted over (60: per minute).
    #[arg(long, default_value_t = 60.0, env = "KILN_RATE_LIMIT_PERIOD")]
    pub rate_limit_period: f64,
}

/// Requests and tokens per period of one tier (0 = unlimited).
#[derive(Debug, Clone, Copy, Default)]
pub struct TierLimits {
    pub requests: u64,
    pub tokens: u64,
}

/// Every tier's limits and the period they are counted over.
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    pub global: TierLimits,
    pub key: TierLimits,
    pub anonymous: TierLimits,
    pub period: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        let off = TierLimits::default();
        Self { global: off, key: off, anonymous: off, period: Duration::from_secs(60) }
    }
}

impl RateLimitArgs {
    pub fn limits(&self) -> RateLimits {
        let tier = |requests, tokens| TierLimits { requests, tokens };
        RateLimits {
            global: tier(self.rate_limit_global_rpm, self.rate_limit_global_tpm),
            key: tier(self.rate_limit_key_rpm, self.rate_limit_key_tpm),
            anonymous: tier(self.rate_limit_anonymous_rpm, self.rate_limit_anonymous_tpm),
            // NaN or an absurd period falls back to a minute rather than panicking.
            period: Duration::try_from_secs_f64(self.rate_limit_period.clamp(0.001, 1e9))
                .unwrap_or(Duration::from_secs(60)),
        }
    }
}

/// The tiers, as the `tier` label of `kiln:rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Global = 0,
    Key = 1,
    Anonymous = 2,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Global, Tier::Key, Tier::Anonymous];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Global => "global",
            Tier::Key => "key",
            Tier::Anonymous => "anonymous",
        }
    }
}

/// One token bucket: `level` of `capacity`, refilled at `per_sec`; below zero is debt.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(limit: u64, period: Duration, now: Instant) -> Option<Self> {
        (limit > 0).then(|| Self {
            capacity: limit as f64,
            per_sec: limit as f64 / period.as_secs_f64(),
            level: limit as f64,
            updated: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + dt * self.per_sec).min(self.capacity);
        self.updated = now;
    }

    /// How long until the bucket holds `need` (zero if it does).
    fn wait_for(&self, need: f64) -> Duration {
        Duration::from_secs_f64(((need - self.level) / self.per_sec).max(0.0))
    }

    fn view(&self) -> BucketView {
        BucketView {
            limit: self.capacity as u64,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.wait_for(self.capacity),
        }
    }
}

/// What the `x-ratelimit-*-{requests,tokens}` headers say about one bucket.
#[derive(Debug, Clone, Copy)]
struct BucketView {
    limit: u64,
    remaining: u64,
    /// Until the bucket is full again.
    reset: Duration,
}

/// A tier's two buckets.
#[derive(Debug, Clone, Copy)]
struct Pair {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Pair {
    fn new(l: TierLimits, period: Duration, now: Instant) -> Self {
        Self { requests: Bucket::new(l.requests, period, now), tokens: Bucket::new(l.tokens, period, now) }
    }

    fn refill(&mut self, now: Instant) {
        self.requests.iter_mut().chain(self.tokens.iter_mut()).for_each(|b| b.refill(now));
    }

    /// How long until one request and one token fit (zero: they do now).
    fn wait(&self) -> Duration {
        let w = |b: &Option<Bucket>| b.map_or(Duration::ZERO, |b| b.wait_for(1.0));
        w(&self.requests).max(w(&self.tokens))
    }
}

/// Who a request counts against besides the global tier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// An authenticated caller, by subject (a key's `subject` or `key:<fingerprint>`, a JWT's
    /// `sub`; the key itself is never kept here). Keys and tokens naming one subject share it.
    Key(String),
    Anonymous,
}

const SHARDS: usize = 16;

/// The buckets of every tier. Per-key buckets sit in a few sharded maps (one short lock each);
/// the map only grows with authenticated subjects, since bad credentials are refused before this.
pub struct RateLimiter {
    limits: RateLimits,
    global: Mutex<Pair>,
    anonymous: Mutex<Pair>,
    keys: Vec<Mutex<HashMap<String, Pair>>>,
}

/// The admission decision and what the headers report.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    /// The tier that refused, or None when admitted.
    pub refused_by: Option<Tier>,
    /// Until the refused request could be admitted.
    pub retry_after: Duration,
    requests: Option<BucketView>,
    tokens: Option<BucketView>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            global: Mutex::new(Pair::new(limits.global, limits.period, now)),
            anonymous: Mutex::new(Pair::new(limits.anonymous, limits.period, now)),
            keys: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// True when any limit is set (else the middleware does nothing at all).
    pub fn enabled(&self) -> bool {
        let on = |t: TierLimits| t.requests > 0 || t.tokens > 0;
        on(self.limits.global) || on(self.limits.key) || on(self.limits.anonymous)
    }

    fn with_client<T>(&self, client: &Client, f: impl FnOnce(&mut Pair, Tier) -> T) -> T {
        match client {
            Client::Anonymous => f(&mut lock(&self.anonymous), Tier::Anonymous),
            Client::Key(fp) => {
                let shard = fp.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize)) % SHARDS;
                let mut map = lock(&self.keys[shard]);
                let (limits, period) = (self.limits.key, self.limits.period);
                let pair = map.entry(fp.clone()).or_insert_with(|| Pair::new(limits, period, Instant::now()));
                f(pair, Tier::Key)
            }
        }
    }

    /// Admits one request for `client` (taking one request from each of its buckets) or says
    /// which tier refuses it and for how long. Locks: global, then the client's (always so).
    pub fn admit(&self, client: &Client) -> Decision {
        let now = Instant::now();
        let mut global = lock(&self.global);
        global.refill(now);
        self.with_client(client, |pair, tier| {
            pair.refill(now);
            let refused = [(Tier::Global, global.wait()), (tier, pair.wait())]
                .into_iter()
                .filter(|(_, w)| !w.is_zero())
                .max_by_key(|(_, w)| *w);
            if refused.is_none() {
                for b in [&mut global.requests, &mut pair.requests].into_iter().flatten() {
                    b.level -= 1.0;
                }
            }
            let tightest = |a: Option<Bucket>, b: Option<Bucket>| match (a, b) {
                (Some(a), Some(b)) => Some(if b.level / b.capacity < a.level / a.capacity { b } else { a }),
                (a, b) => a.or(b),
            };
            Decision {
                refused_by: refused.map(|r| r.0),
                retry_after: refused.map_or(Duration::ZERO, |r| r.1),
                requests: tightest(global.requests, pair.requests).map(|b| b.view()),
                tokens: tightest(global.tokens, pair.tokens).map(|b| b.view()),
            }
        })
    }

    /// Takes `n` used tokens from the global and the client's token buckets (into debt if need be).
    pub fn charge(&self, client: &Client, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let mut global = lock(&self.global);
        self.with_client(client, |pair, _| {
            for b in [&mut global.tokens, &mut pair.tokens].into_iter().flatten() {
                b.refill(now);
                b.level -= n as f64;
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The token charge of the request being handled: generation and embeddings report the tokens
/// they use through it ([`charge_tokens`]); it is set for the handler's task by the middleware.
#[derive(Clone)]
pub struct TokenCharge {
    limiter: Arc<RateLimiter>,
    client: Client,
}

impl TokenCharge {
    pub fn tokens(&self, n: usize) {
        self.limiter.charge(&self.client, n);
    }
}

tokio::task_local! {
    static CHARGE: TokenCharge;
}

/// The current request's charge, if rate limits are on (call from the handler's task; keep the
/// value to charge later, e.g. when a stream ends).
pub fn current_charge() -> Option<TokenCharge> {
    CHARGE.try_with(TokenCharge::clone).ok()
}

/// The client a request counts against: the subject `access::gate` authenticated, else (auth
/// off) the anonymous tier.
fn client_of(req: &Request) -> Client {
    match req.extensions().get::<Principal>() {
        Some(p) if p.via != Via::Open => Client::Key(p.subject.clone()),
        _ => Client::Anonymous,
    }
}

/// The middleware: every route but `/health` and `/metrics` is admitted here or refused 429.
pub async fn limit(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let limiter = state.rate_limits.clone();
    if !limiter.enabled() || matches!(req.uri().path(), "/health" | "/metrics") {
        return next.run(req).await;
    }
    let client = client_of(&req);
    let d = limiter.admit(&client);
    if let Some(tier) = d.refused_by {
        state.metrics.count_rate_limited(tier);
        let secs = d.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("Rate limit reached for the {} tier; retry in {secs} s", tier.as_str()),
        )
        .with_code("rate_limit_exceeded");
        let mut resp = e.into_response();
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp.extensions_mut().insert(super::audit::Denied::RateLimited(tier));
        set_headers(resp.headers_mut(), &d);
        return resp;
    }
    let mut resp = CHARGE.scope(TokenCharge { limiter, client }, next.run(req)).await;
    set_headers(resp.headers_mut(), &d);
    resp
}

fn set_headers(h: &mut HeaderMap, d: &Decision) {
    for (kind, view) in [("requests", d.requests), ("tokens", d.tokens)] {
        let Some(v) = view else { continue };
        let name = |what: &str| HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")).expect("valid name");
        h.insert(name("limit"), HeaderValue::from(v.limit));
        h.insert(name("remaining"), HeaderValue::from(v.remaining));
        if let Ok(reset) = HeaderValue::from_str(&format_reset(v.reset)) {
            h.insert(name("reset"), reset);
        }
    }
}

/// OpenAI's reset format: `20ms`, `1.5s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{:.3}", (secs * 1000.0).ceil() / 1000.0);
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("{}m{}s", whole / 60, whole % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: u64, tpm: u64) -> RateLimits {
        RateLimits { key: TierLimits { requests: rpm, tokens: tpm }, ..RateLimits::default() }
    }

    #[test]
    fn a_burst_gets_the_bucket_then_refusals_with_a_wait() {
        let rl = RateLimiter::new(limits(60, 0));
        let a = Client::Key("a".into());
        for i in 0..60 {
            assert!(rl.admit(&a).refused_by.is_none(), "request {i}");
        }
        let d = rl.admit(&a);
        assert_eq!(d.refused_by, Some(Tier::Key));
        assert!(d.retry_after > Duration::from_millis(900) && d.retry_after <= Duration::from_secs(1));
        assert_eq!(d.requests.unwrap().remaining, 0);
        // Another key has its own bucket; the global and anonymous tiers are off.
        assert!(rl.admit(&Client::Key("b".into())).refused_by.is_none());
        assert!(rl.admit(&Client::Anonymous).refused_by.is_none());
    }

    #[test]
    fn tokens_are_charged_after_and_debt_delays() {
        let rl = RateLimiter::new(limits(0, 600));
        let a = Client::Key("a".into());
        assert!(rl.admit(&a).refused_by.is_none());
        rl.charge(&a, 1200);
        let d = rl.admit(&a);
        assert_eq!(d.refused_by, Some(Tier::Key));
        // 601 tokens of debt at 10 tokens/s.
        assert!((d.retry_after.as_secs_f64() - 60.1).abs() < 0.1, "{:?}", d.retry_after);
    }

    #[test]
    fn reset_formats() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(2)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
