//! Greedy continuations through the whole engine against llama.cpp's reference tokens and
//! log-probabilities (`tests/reference/`, same GGUF files), compared up to the first position
//! where the reference itself has a near-tie (top-2 logprob gap < 0.05).
//!
//! With quantized weights the model is chaotic at the last bit (an activation crossing a Q8
//! rounding boundary moves logits by tenths), so llama.cpp disagrees with its own reference by
//! up to ~0.1 in logprob just by switching flash attention off; only an implementation that is
//! bit-identical to llama.cpp's x86 build can meet the bar. SmolLM2 (Q4_1 / Q8_0) runs
//! entirely on kiln's kernels, which follow ggml's x86 arithmetic op by op, so it is held to the
//! bar itself: every continuation equal up to the cutoff, logprobs within 0.05 (in practice
//! ~1e-4: only the logprob formula differs). Qwen2.5's mix (Q5_0 / Q8_0 / Q4_K / Q6_K) runs on
//! kiln's kernels too, but llama.cpp rounds its k-quant matmuls differently for a prompt batch
//! than for one token (see `kiln_kernels::quant::Form`), and the reference was made with the
//! whole prompt in one ubatch. So Qwen runs with `llama_cpp_batch_arithmetic` (the same per-step
//! choice as llama.cpp's CPU backend) and is held to the same bar. (With the default,
//! batch-invariant arithmetic kiln equals llama.cpp run with `-ub 1`, token for token and
//! logprob for logprob, which is 14/15 against this reference, max |dlogprob| 0.14.)

use anyhow::Result;
use kiln_inference::engine::EngineConfig;
use kiln_inference::engine::{EngineHandle, Prompt};
use kiln_inference::SamplingParams;
use kiln_tests::{ids, qwen25, reference, run, smollm2, start, test_config};
use serde_json::Value;

/// How one continuation compares with its reference.
#[derive(Debug)]
struct Agreement {
    name: String,
    /// Positions compared (the reference's near-tie cutoff).
    cutoff: usize,
    /// Leading tokens equal to the reference (capped at the cutoff).
    matched: usize,
    /// Largest |logprob - reference| over the matched positions.
    max_lp_diff: f32,
    sum_lp_diff: f32,
}

fn compare(h: &EngineHandle, name: String, entry: &Value, eos: &[u32]) -> Result<Agreement> {
    let prompt = ids(&entry["prompt_ids"]);
    let steps = entry["steps"].as_array().cloned().unwrap_or_default();
    let gap =
        |s: &Value| s["top"][0]["logprob"].as_f64().unwrap_or(0.0) - s["top"][1]["logprob"].as_f64().unwrap_or(0.0);
    let cutoff = steps.iter().position(|s| gap(s) < 0.05).unwrap_or(steps.len());
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(steps.len()),
        logprobs: true,
        top_logprobs: 2,
        ..SamplingParams::default()
    };
    let out = run(h, Prompt::Tokens(prompt), params)?.remove(0);
    let (mut matched, mut max_lp_diff, mut sum_lp_diff) = (0, 0f32, 0f32);
    for (i, step) in steps.iter().enumerate().take(cutoff) {
        let want_id = step["id"].as_u64().unwrap_or(u64::MAX) as u32;
        match out.tokens.get(i) {
            Some(&t) if t == want_id => {
                let d = (out.logprobs[i].logprob - step["logprob"].as_f64().unwrap_or(0.0) as f32).abs();
                (max_lp_diff, sum_lp_diff) = (max_lp_diff.max(d), sum_lp_diff + d);
            }
            // EOS ends our stream without being emitted; the reference lists it as a step.
            None if out.finish_reason == Some("stop") && i == out.tokens.len() && eos.contains(&want_id) => {}
            _ => break,
        }
        matched += 1;
    }
    Ok(Agreement { name, cutoff, matched, max_lp_diff, sum_lp_diff })
}

/// Issue #2's bar: every continuation equal to the reference up to its near-tie cutoff, and
/// logprobs within 0.05 there.
fn check_model(path: &std::path::Path, reference_file: &str, cfg: &EngineConfig) -> Result<()> {
    let engine = start(path, cfg)?;
    let r = reference(reference_file)?;
    let eos = engine.handle.tokenizer().eos_ids.clone();
    let mut rows = Vec::new();
    for kind in ["completion", "chat"] {
        for (i, e) in r[kind].as_array().cloned().unwrap_or_default().iter().enumerate() {
            rows.push(compare(&engine.handle, format!("{kind}[{i}]"), e, &eos)?);
        }
    }
    engine.handle.shutdown();
    let full = rows.iter().filter(|a| a.matched == a.cutoff).count();
    let positions: usize = rows.iter().map(|a| a.matched).sum();
    let mean = rows.iter().map(|a| a.sum_lp_diff).sum::<f32>() / positions.max(1) as f32;
    let max = rows.iter().map(|a| a.max_lp_diff).fold(0f32, f32::max);
    eprintln!("{reference_file}: {full}/{} continuations match up to the near-tie cutoff; logprob |diff| mean {mean:.4}, max {max:.4}", rows.len());
    for a in &rows {
        eprintln!("  {:<14} {:>2}/{:<2} tokens, max |dlogprob| {:.3}", a.name, a.matched, a.cutoff, a.max_lp_diff);
    }
    assert!(full == rows.len(), "only {full}/{} continuations match up to the cutoff: {rows:#?}", rows.len());
    assert!(max < 0.05, "logprobs differ by up to {max} (bar: 0.05)");
    Ok(())
}

#[test]
fn smollm2_greedy_matches_llama_cpp() -> Result<()> {
    check_model(&smollm2()?, "smollm2-135m-instruct-q4_1.json", &test_config())
}

#[test]
fn qwen25_greedy_matches_llama_cpp() -> Result<()> {
    let Some(p) = qwen25() else { return Ok(()) };
    let cfg = EngineConfig { llama_cpp_batch_arithmetic: true, ..test_config() };
    check_model(&p, "qwen2.5-coder-0.5b-instruct-q4_k_m.json", &cfg)
}
