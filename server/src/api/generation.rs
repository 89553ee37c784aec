//! One engine request as the HTTP layer sees it: a `TokenStream` plus the timing that feeds the
//! latency metrics, and the non-streaming collection of its choices. Dropping a `Tracked`
//! drops the stream, which aborts the sequences in the engine (client gone).

use super::ratelimit::{current_charge, TokenCharge};
use super::Shared;
use kiln_inference::engine::{EngineHandle, Prompt};
use kiln_inference::{Delta, EngineError, FinishReason, SamplingParams, TokenLogprob, TokenStream};
use std::sync::atomic::Ordering;
use std::time::Instant;

pub struct Tracked {
    stream: TokenStream,
    state: Shared,
    start: Instant,
    last: Option<Instant>,
    pub generated: usize,
    /// The request's rate-limit token charge: prompt tokens at submit, generated ones on drop.
    charge: Option<TokenCharge>,
}

/// Submits through the engine's async entry: tokenization and grammar compilation stay off the async workers.
pub async fn submit(
    state: &Shared,
    engine: &EngineHandle,
    prompt: Prompt,
    params: SamplingParams,
) -> Result<Tracked, EngineError> {
    let stream = engine.generate_async(prompt, params).await?;
    Ok(track(state, stream))
}

/// Tracks a stream the caller started itself (a session turn); call from the handler's task,
/// where the rate-limit charge is known.
pub fn track(state: &Shared, stream: TokenStream) -> Tracked {
    state.metrics.prompt_tokens.fetch_add(stream.prompt_tokens() as u64, Ordering::Relaxed);
    let charge = current_charge();
    if let Some(c) = &charge {
        c.tokens(stream.prompt_tokens());
    }
    Tracked { stream, state: state.clone(), start: Instant::now(), last: None, generated: 0, charge }
}

impl Tracked {
    pub fn prompt_tokens(&self) -> usize {
        self.stream.prompt_tokens()
    }

    pub fn cached_tokens(&self) -> usize {
        self.stream.cached_tokens()
    }

    pub fn num_choices(&self) -> usize {
        self.stream.num_choices()
    }

    pub async fn next(&mut self) -> Option<Result<Delta, EngineError>> {
        let d = self.stream.next().await;
        if let Some(Ok(delta)) = &d {
            self.on_delta(delta);
        }
        d
    }

    fn on_delta(&mut self, d: &Delta) {
        let m = &self.state.metrics;
        if !d.tokens.is_empty() {
            let now = Instant::now();
            match self.last {
                None => m.ttft.observe((now - self.start).as_secs_f64()),
                Some(prev) => m.inter_token.observe((now - prev).as_secs_f64() / d.tokens.len() as f64),
            }
            self.last = Some(now);
            self.generated += d.tokens.len();
            m.generation_tokens.fetch_add(d.tokens.len() as u64, Ordering::Relaxed);
        }
        if let Some(r) = d.finish_reason {
            m.count_finished(r.as_str());
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.state.metrics.e2e.observe(self.start.elapsed().as_secs_f64());
        if let Some(c) = &self.charge {
            c.tokens(self.generated);
        }
    }
}

/// One finished choice.
#[derive(Debug, Default)]
pub struct ChoiceOut {
    pub text: String,
    pub tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    /// Per logprob entry: characters of `text` before its token's text (`text_offset`).
    pub offsets: Vec<usize>,
    pub finish: Option<FinishReason>,
}

/// Drains every choice of a request.
pub async fn collect(t: &mut Tracked) -> Result<Vec<ChoiceOut>, EngineError> {
    let mut outs: Vec<ChoiceOut> = (0..t.num_choices()).map(|_| ChoiceOut::default()).collect();
    while let Some(d) = t.next().await {
        let d = d?;
        let o = &mut outs[d.index];
        let at = o.text.chars().count();
        o.offsets.extend(std::iter::repeat_n(at, d.logprobs.len()));
        o.text.push_str(&d.text);
        o.tokens += d.tokens.len();
        o.logprobs.extend(d.logprobs);
        if d.finish_reason.is_some() {
            o.finish = d.finish_reason;
        }
    }
    Ok(outs)
}

/// OpenAI `usage`.
pub fn usage(prompt: usize, completion: usize, cached: usize) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
