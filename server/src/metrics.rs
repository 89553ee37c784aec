//! Prometheus metrics in the text exposition format, named like vLLM's with a `kiln:` prefix so
//! existing dashboards map over. Counters and histograms are atomics (the hot path never takes a
//! lock except for the per-status request counter map); engine gauges are read from the
//! engine's published stats at scrape time.

use crate::api::ratelimit::Tier;
use kiln_inference::embed::EmbedHandle;
use kiln_inference::engine::EngineHandle;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A fixed-bucket histogram of seconds.
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket, plus one for +Inf.
    counts: Vec<AtomicU64>,
    /// Sum in microseconds (atomics hold integers).
    sum_us: AtomicU64,
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0) }
    }

    pub fn observe(&self, secs: f64) {
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cum}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_sum{{{}}} {sum}\n{name}_count{{{}}} {cum}",
            labels.trim_end_matches(','),
            labels.trim_end_matches(',')
        );
    }
}

pub struct Metrics {
    model: String,
    /// (route, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// finish reason -> finished choices.
    finished: Mutex<BTreeMap<&'static str, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    pub embedding_requests: AtomicU64,
    pub embedding_tokens: AtomicU64,
    /// Inputs per embedding request.
    pub embedding_inputs: Histogram,
    pub embedding_latency: Histogram,
    /// Requests refused by a rate limit, by `Tier` (its discriminant).
    rate_limited: [AtomicU64; 3],
    /// Audit-log lines dropped because the writer fell behind.
    pub audit_dropped: AtomicU64,
}

const INPUT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];

impl Metrics {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.replace('"', "'"),
            requests: Mutex::new(BTreeMap::new()),
            finished: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BUCKETS),
            inter_token: Histogram::new(LATENCY_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            embedding_requests: AtomicU64::new(0),
            embedding_tokens: AtomicU64::new(0),
            embedding_inputs: Histogram::new(INPUT_BUCKETS),
            embedding_latency: Histogram::new(LATENCY_BUCKETS),
            rate_limited: Default::default(),
            audit_dropped: AtomicU64::new(0),
        }
    }

    pub fn observe_embeddings(&self, inputs: usize, tokens: usize, secs: f64) {
        self.embedding_requests.fetch_add(1, Ordering::Relaxed);
        self.embedding_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.embedding_inputs.observe(inputs as f64);
        self.embedding_latency.observe(secs);
    }

    pub fn count_request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn count_rate_limited(&self, tier: Tier) {
        self.rate_limited[tier as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_finished(&self, reason: &'static str) {
        let mut m = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(reason).or_default() += 1;
    }

    /// The whole exposition; `engine` is `None` while the model loads.
    pub fn render(&self, engine: Option<&EngineHandle>, embedder: Option<&EmbedHandle>) -> String {
        let mut out = String::new();
        let l = format!("model_name=\"{}\",", self.model);
        let lb = format!("{{{}}}", l.trim_end_matches(','));
        if let Some(h) = engine {
            engine_gauges(&mut out, h, &lb);
        }
        let mut gauge = |name: &str, help: &str, kind: &str, v: f64| scalar(&mut out, (name, help, kind), &lb, v);
        gauge(
            "kiln:prompt_tokens_total",
            "Prompt tokens processed.",
            "counter",
            self.prompt_tokens.load(Ordering::Relaxed) as f64,
        );
        gauge(
            "kiln:generation_tokens_total",
            "Tokens generated.",
            "counter",
            self.generation_tokens.load(Ordering::Relaxed) as f64,
        );
        let _ = writeln!(out, "# HELP kiln:http_requests_total HTTP requests by route and status.\n# TYPE kiln:http_requests_total counter");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "kiln:http_requests_total{{{l}route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP kiln:request_success_total Finished choices by finish reason.\n# TYPE kiln:request_success_total counter");
        for (reason, n) in self.finished.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "kiln:request_success_total{{{l}finished_reason=\"{reason}\"}} {n}");
        }
        self.ttft.render(&mut out, "kiln:time_to_first_token_seconds", &l, "Time to first token.");
        self.inter_token.render(
            &mut out,
            "kiln:inter_token_latency_seconds",
            &l,
            "Time between consecutive output tokens.",
        );
        self.e2e.render(&mut out, "kiln:e2e_request_latency_seconds", &l, "End-to-end request latency.");
        let mut line = |name: &str, help: &str, kind: &str, v: u64| scalar(&mut out, (name, help, kind), "", v as f64);
        line(
            "kiln:embedding_requests_total",
            "Embedding requests answered.",
            "counter",
            self.embedding_requests.load(Ordering::Relaxed),
        );
        line(
            "kiln:embedding_tokens_total",
            "Tokens embedded.",
            "counter",
            self.embedding_tokens.load(Ordering::Relaxed),
        );
        self.embedding_inputs.render(
            &mut out,
            "kiln:embedding_inputs_per_request",
            "",
            "Inputs per embedding request.",
        );
        self.embedding_latency.render(
            &mut out,
            "kiln:embedding_request_latency_seconds",
            "",
            "Embedding request latency.",
        );
        self.render_limits(&mut out);
        if let Some(e) = embedder {
            // Batch sizes as the worker formed them (mean = sequences / batches).
            let st = e.stats();
            let mut line =
                |name: &str, help: &str, kind: &str, v: u64| scalar(&mut out, (name, help, kind), "", v as f64);
            line(
                "kiln:embedding_batches_total",
                "Encoder forward passes.",
                "counter",
                st.batches.load(Ordering::Relaxed),
            );
            line(
                "kiln:embedding_batch_sequences_total",
                "Sequences summed over encoder batches.",
                "counter",
                st.sequences.load(Ordering::Relaxed),
            );
            line(
                "kiln:embedding_last_batch_sequences",
                "Sequences in the latest encoder batch.",
                "gauge",
                st.last_batch_seqs.load(Ordering::Relaxed),
            );
            line(
                "kiln:embedding_last_batch_tokens",
                "Tokens in the latest encoder batch.",
                "gauge",
                st.last_batch_tokens.load(Ordering::Relaxed),
            );
            line(
                "kiln:embedding_queued_requests",
                "Embedding requests waiting for the worker.",
                "gauge",
                e.queued_requests() as u64,
            );
        }
        out
    }
}

impl Metrics {
    fn render_limits(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP kiln:rate_limited_total Requests refused by a rate limit, by tier.\n# TYPE kiln:rate_limited_total counter");
        for tier in Tier::ALL {
            let n = self.rate_limited[tier as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "kiln:rate_limited_total{{tier=\"{}\"}} {n}", tier.as_str());
        }
        let dropped = self.audit_dropped.load(Ordering::Relaxed) as f64;
        scalar(
            out,
            ("kiln:audit_log_dropped_total", "Audit-log lines dropped (writer behind).", "counter"),
            "",
            dropped,
        );
    }
}

/// One single-valued metric with its HELP and TYPE lines; `labels` is `{...}` or empty.
/// The engine's gauges and counters, read from its published stats.
fn engine_gauges(out: &mut String, h: &EngineHandle, labels: &str) {
    let s = h.stats();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let total = h.info().num_blocks as f64;
    let used = total - load(&s.free_blocks);
    let usage = if total > 0.0 { used / total } else { 0.0 };
    let (running, waiting) = (load(&s.running), load(&s.waiting));
    let rows = [
        ("kiln:num_requests_running", "Sequences in the running batch.", "gauge", running),
        ("kiln:num_requests_waiting", "Sequences waiting to be scheduled.", "gauge", waiting),
        ("kiln:kv_blocks_total", "KV cache blocks in the pool.", "gauge", total),
        ("kiln:kv_blocks_used", "KV cache blocks held by sequences and parked sessions.", "gauge", used),
        ("kiln:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", "gauge", usage),
        (
            "kiln:kv_blocks_cached_free",
            "Free KV blocks still holding reusable cached prefixes (evicted LRU when needed).",
            "gauge",
            load(&s.free_cached_blocks),
        ),
        (
            "kiln:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            "counter",
            load(&s.prefix_cache_queries),
        ),
        (
            "kiln:prefix_cache_hits_total",
            "Prompt tokens whose K/V came from the prefix cache.",
            "counter",
            load(&s.prefix_cache_hits),
        ),
        (
            "kiln:prefix_cache_evictions_total",
            "Cached KV blocks evicted for reuse.",
            "counter",
            load(&s.prefix_cache_evictions),
        ),
        ("kiln:num_sessions_parked", "Sessions holding their KV between turns.", "gauge", load(&s.parked_sessions)),
        (
            "kiln:sessions_evicted_total",
            "Parked sessions whose KV was released for room.",
            "counter",
            load(&s.evicted_sessions),
        ),
        (
            "kiln:num_requests_rejected_total",
            "Requests refused with 429 because too many requests or prompt tokens were waiting.",
            "counter",
            load(&s.rejected_requests),
        ),
        ("kiln:num_waiting_tokens", "Prompt tokens of requests not yet running.", "gauge", load(&s.waiting_tokens)),
        ("kiln:computed_tokens_total", "Tokens run through the model.", "counter", load(&s.computed_tokens)),
        ("kiln:num_preemptions_total", "Sequences preempted by recompute.", "counter", load(&s.preemptions)),
        (
            "kiln:grammar_masks_total",
            "Token masks computed for constrained sequences.",
            "counter",
            load(&s.grammar_masks),
        ),
        (
            "kiln:grammar_mask_seconds_total",
            "Time spent computing token masks (beside the forward pass).",
            "counter",
            load(&s.grammar_mask_ns) * 1e-9,
        ),
        (
            "kiln:grammar_forced_tokens_total",
            "Tokens a grammar forced, appended without sampling.",
            "counter",
            load(&s.forced_tokens),
        ),
        // Under vLLM's own names: what the Gateway API Inference Extension / llm-d endpoint
        // pickers read to route between replicas.
        ("vllm:num_requests_running", "Sequences in the running batch.", "gauge", running),
        ("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", "gauge", waiting),
        ("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", "gauge", usage),
        ("vllm:gpu_cache_usage_perc", "Fraction of KV cache blocks in use (0-1; the older name).", "gauge", usage),
    ];
    for (name, help, kind, v) in rows {
        scalar(out, (name, help, kind), labels, v);
    }
}

fn scalar(out: &mut String, (name, help, kind): (&str, &str, &str), labels: &str, v: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {v}");
}

/// The agent layer's counters (`kiln:agent_*`), when the runtime is up.
pub fn agent_metrics(out: &mut String, st: &kiln_agent::runtime::AgentStats) {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    let _ = writeln!(out, "# HELP kiln:agent_runs_total Agent runs by how they ended (paused = requires_action).\n# TYPE kiln:agent_runs_total counter");
    let _ = writeln!(out, "kiln:agent_runs_total{{status=\"started\"}} {}", get(&st.runs_started));
    for (status, c) in [
        ("completed", &st.runs_completed),
        ("incomplete", &st.runs_incomplete),
        ("failed", &st.runs_failed),
        ("cancelled", &st.runs_cancelled),
        ("paused", &st.runs_paused),
    ] {
        let _ = writeln!(out, "kiln:agent_runs_total{{status=\"{status}\"}} {}", get(c));
    }
    for (name, help, c) in [
        ("kiln:agent_steps_total", "Model turns of agent runs.", &st.steps),
        ("kiln:agent_prefilled_tokens_total", "Prompt tokens agent turns prefilled.", &st.prefilled_tokens),
        (
            "kiln:agent_reused_tokens_total",
            "Prompt tokens agent turns reused from their session or the prefix cache.",
            &st.reused_tokens,
        ),
        ("kiln:agent_completion_tokens_total", "Tokens agent turns generated.", &st.completion_tokens),
        ("kiln:agent_model_milliseconds_total", "Time in agent model turns.", &st.model_ms),
        ("kiln:agent_tool_calls_total", "Tool calls executed by agent runs.", &st.tool_calls),
        (
            "kiln:agent_tool_errors_total",
            "Tool calls whose result was an error (failure, timeout, crash).",
            &st.tool_errors,
        ),
        ("kiln:agent_tool_milliseconds_total", "Time in tool calls.", &st.tool_ms),
    ] {
        scalar(out, (name, help, "counter"), "", get(c));
    }
}
