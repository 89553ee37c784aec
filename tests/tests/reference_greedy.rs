//! Greedy continuations through the whole engine against llama.cpp's reference tokens and
//! log-probabilities (`../shared/reference/`, same GGUF files), compared up to the first position
//! where the reference itself has a near-tie (top-2 logprob gap < 0.05).
//!
//! With quantized weights the model is chaotic at the last bit (an activation crossing a Q8
//! rounding boundary moves logits by tenths), so llama.cpp disagrees with its own reference by
//! up to ~0.1 in logprob just by switching flash attention off; only an implementation that is
//! bit-identical to llama.cpp's x86 build can meet the bar. SmolLM2 (Q4_1 / Q8_0) runs
//! entirely on kiln's kernels, which follow ggml's x86 arithmetic op by op, so it is held to the
//! bar itself: every continuation equal up to the cutoff, logprobs within 0.05 (in practice
//! ~1e-4: only the logprob formula differs). Qwen2.5's k-quant / Q5_0 matmuls still go through
//! candle (not ggml's rounding), so it is held to llama.cpp's own spread: every first token,
//! most continuations, logprobs within what a real bug would exceed by whole units.

use anyhow::Result;
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
    /// The reference's own top-2 logprob gap at the first position.
    first_gap: f64,
}

fn compare(h: &EngineHandle, name: String, entry: &Value, eos: &[u32]) -> Result<Agreement> {
    let prompt = ids(&entry["prompt_ids"]);
    let steps = entry["steps"].as_array().cloned().unwrap_or_default();
    let gap = |s: &Value| s["top"][0]["logprob"].as_f64().unwrap_or(0.0) - s["top"][1]["logprob"].as_f64().unwrap_or(0.0);
    let cutoff = steps.iter().position(|s| gap(s) < 0.05).unwrap_or(steps.len());
    let params = SamplingParams { temperature: 0.0, max_tokens: Some(steps.len()), logprobs: true, top_logprobs: 2, ..SamplingParams::default() };
    let out = run(h, Prompt::Tokens(prompt), params)?.remove(0);
    let want_id = |i: usize| steps[i]["id"].as_u64().unwrap_or(u64::MAX) as u32;
    let (mut matched, mut max_lp_diff, mut sum_lp_diff) = (0, 0f32, 0f32);
    for i in 0..cutoff {
        match out.tokens.get(i) {
            Some(&t) if t == want_id(i) => {
                let d = (out.logprobs[i].logprob - steps[i]["logprob"].as_f64().unwrap_or(0.0) as f32).abs();
                (max_lp_diff, sum_lp_diff) = (max_lp_diff.max(d), sum_lp_diff + d);
            }
            // EOS ends our stream without being emitted; the reference lists it as a step.
            None if out.finish_reason == Some("stop") && i == out.tokens.len() && eos.contains(&want_id(i)) => {}
            _ => break,
        }
        matched += 1;
    }
    let first_gap = steps.first().map_or(f64::INFINITY, gap);
    Ok(Agreement { name, cutoff, matched, max_lp_diff, sum_lp_diff, first_gap })
}

/// What a model's agreement table must show.
#[derive(Clone, Copy, PartialEq)]
enum Bar {
    /// Issue #2's bar: bit-exact arithmetic, so every continuation matches to the cutoff.
    Exact,
    /// Not bit-exact: within the spread of llama.cpp's own configurations.
    Spread,
}

fn check_model(path: &std::path::Path, reference_file: &str, bar: Bar) -> Result<()> {
    let engine = start(&path.to_path_buf(), &test_config())?;
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
    if bar == Bar::Exact {
        assert!(full == rows.len(), "only {full}/{} continuations match up to the cutoff: {rows:#?}", rows.len());
        assert!(max < 0.05, "logprobs differ by up to {max} (bar: 0.05)");
        return Ok(());
    }
    // Off the exact path, a first token whose reference top-2 gap is within ~2x llama.cpp's own
    // spread (0.1) is a coin flip; a clearer first token must still come out the same.
    let clear = |a: &Agreement| a.first_gap >= 0.25;
    assert!(rows.iter().all(|a| a.matched > 0 || a.cutoff == 0 || !clear(a)), "a clear first token differs: {rows:#?}");
    assert!(full * 10 >= rows.len() * 7, "only {full}/{} continuations match up to the cutoff", rows.len());
    assert!(max < 0.35 && mean < 0.08, "logprobs drift beyond llama.cpp's own spread: mean {mean}, max {max}");
    Ok(())
}

#[test]
fn smollm2_greedy_matches_llama_cpp() -> Result<()> {
    check_model(&smollm2()?, "smollm2-135m-instruct-q4_1.json", Bar::Exact)
}

#[test]
fn qwen25_greedy_matches_llama_cpp() -> Result<()> {
    let Some(p) = qwen25() else { return Ok(()) };
    check_model(&p, "qwen2.5-coder-0.5b-instruct-q4_k_m.json", Bar::Spread)
}
