//! Greedy continuations through the whole engine equal llama.cpp's reference tokens up to the
//! first position where the reference itself has a near-tie (top-2 logprob gap < 0.05), with
//! top-1 logprobs within 0.05 there. References: `../shared/reference/` (llama.cpp, same GGUF).

use anyhow::Result;
use kiln_inference::engine::{EngineHandle, Prompt};
use kiln_inference::SamplingParams;
use kiln_tests::{ids, reference, run, smollm2, start, test_config, qwen25};
use serde_json::Value;

/// Compares one reference entry; returns a description of the mismatch, if any.
fn check_entry(h: &EngineHandle, entry: &Value, eos: &[u32]) -> Result<Option<String>> {
    let prompt = ids(&entry["prompt_ids"]);
    let steps = entry["steps"].as_array().cloned().unwrap_or_default();
    let cutoff = steps
        .iter()
        .position(|s| s["top"][0]["logprob"].as_f64().unwrap_or(0.0) - s["top"][1]["logprob"].as_f64().unwrap_or(0.0) < 0.05)
        .unwrap_or(steps.len());
    let params = SamplingParams { temperature: 0.0, max_tokens: Some(steps.len()), logprobs: true, top_logprobs: 2, ..SamplingParams::default() };
    let out = run(h, Prompt::Tokens(prompt), params)?.remove(0);
    let mut got = out.tokens.clone();
    if out.finish_reason == Some("stop") && got.len() < steps.len() {
        got.push(steps[got.len()]["id"].as_u64().unwrap_or(u64::MAX) as u32); // EOS is not emitted
        if !eos.contains(got.last().unwrap_or(&0)) {
            return Ok(Some(format!("stopped early after {} tokens", out.tokens.len())));
        }
    }
    for (i, s) in steps.iter().take(cutoff).enumerate() {
        let want = s["id"].as_u64().unwrap_or(u64::MAX) as u32;
        if got.get(i) != Some(&want) {
            return Ok(Some(format!("position {i} (cutoff {cutoff}): got {:?}, want {want}; text so far {:?}", got.get(i), out.text)));
        }
        if let Some(lp) = out.logprobs.get(i) {
            let want_lp = s["logprob"].as_f64().unwrap_or(0.0) as f32;
            if (lp.logprob - want_lp).abs() > 0.05 {
                return Ok(Some(format!("position {i}: logprob {} vs reference {want_lp}", lp.logprob)));
            }
        }
    }
    Ok(None)
}

fn check_model(path: &std::path::PathBuf, reference_file: &str) -> Result<()> {
    let engine = start(path, &test_config())?;
    let r = reference(reference_file)?;
    let eos = engine.handle.tokenizer().eos_ids.clone();
    let mut failures = Vec::new();
    for kind in ["completion", "chat"] {
        for (i, e) in r[kind].as_array().cloned().unwrap_or_default().iter().enumerate() {
            if let Some(f) = check_entry(&engine.handle, e, &eos)? {
                failures.push(format!("{kind}[{i}]: {f}"));
            }
        }
    }
    engine.handle.shutdown();
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

#[test]
fn smollm2_greedy_matches_llama_cpp() -> Result<()> {
    check_model(&smollm2()?, "smollm2-135m-instruct-q4_1.json")
}

#[test]
fn qwen25_greedy_matches_llama_cpp() -> Result<()> {
    let Some(p) = qwen25() else { return Ok(()) };
    check_model(&p, "qwen2.5-coder-0.5b-instruct-q4_k_m.json")
}
