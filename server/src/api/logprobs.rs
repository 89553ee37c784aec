//! Log-probabilities in OpenAI's two JSON shapes: chat's `logprobs.content[]` (token, logprob,
//! bytes, top_logprobs) and the legacy completions object (parallel arrays plus text offsets).

use kiln_inference::tokenizer::Tokenizer;
use kiln_inference::TokenLogprob;
use serde_json::{json, Map, Value};

/// Chat: `{"content": [...]}`.
pub fn chat(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|(id, text, l)| json!({"token": text, "logprob": l, "bytes": tok.token_bytes(*id).unwrap_or_default()}))
                .collect();
            json!({"token": lp.text, "logprob": lp.logprob, "bytes": lp.bytes, "top_logprobs": top})
        })
        .collect();
    json!({ "content": content })
}

/// Completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. `offsets[i]` is
/// the position, in characters of the choice's returned text, where token i's text starts (as
/// OpenAI and vLLM count); streamed and non-streamed responses compute it from the same deltas.
pub fn completion(lps: &[TokenLogprob], offsets: &[usize]) -> Value {
    let top: Vec<Value> = lps
        .iter()
        .map(|lp| Value::Object(lp.top.iter().map(|(_, t, l)| (t.clone(), json!(l))).collect::<Map<_, _>>()))
        .collect();
    json!({
        "tokens": lps.iter().map(|l| l.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}
