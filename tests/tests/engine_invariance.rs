//! Black-box invariance tests of the engine on the real SmolLM2 model (llama.cpp's server tests
//! are the model for these): a greedy or seeded request gives the same tokens alone, among 8
//! concurrent requests, with chunked vs whole prefill, and after preemption; `n > 1` shares the
//! prompt; every KV block is free again after finished, stopped and aborted sequences.

use anyhow::Result;
use kiln_inference::engine::{EngineConfig, EngineHandle, Prompt};
use kiln_inference::SamplingParams;
use kiln_tests::{collect, run, smollm2, start, test_config, wait_all_blocks_free, Output};
use std::sync::atomic::Ordering;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def add(a, b):\n    return",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
    "Rust is a programming language that",
];

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens: Some(n), ..SamplingParams::default() }
}

fn seeded(n: usize, seed: u64) -> SamplingParams {
    SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(seed), max_tokens: Some(n), ..SamplingParams::default() }
}

fn alone(h: &EngineHandle, params: &SamplingParams) -> Result<Vec<Output>> {
    PROMPTS.iter().map(|p| Ok(run(h, Prompt::Text(p.to_string()), params.clone())?.remove(0))).collect()
}

/// All prompts submitted at once, collected concurrently.
fn together(h: &EngineHandle, params: &SamplingParams) -> Result<Vec<Output>> {
    let streams = PROMPTS
        .iter()
        .map(|p| h.generate(Prompt::Text(p.to_string()), params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let threads: Vec<_> = streams.into_iter().map(|s| std::thread::spawn(move || collect(s))).collect();
    threads.into_iter().map(|t| Ok(t.join().map_err(|_| anyhow::anyhow!("panicked"))??.remove(0))).collect()
}

fn tokens(outs: &[Output]) -> Vec<Vec<u32>> {
    outs.iter().map(|o| o.tokens.clone()).collect()
}

#[test]
fn same_tokens_alone_concurrent_chunked_and_preempted() -> Result<()> {
    let model = smollm2()?;
    let base = start(&model, &test_config())?;
    let h = &base.handle;
    for params in [greedy(24), seeded(24, 7)] {
        let want = tokens(&alone(h, &params)?);
        assert!(want.iter().all(|t| !t.is_empty()));
        assert_eq!(tokens(&together(h, &params)?), want, "8 concurrent changed the output ({params:?})");

        let chunked = start(&model, &EngineConfig { max_num_batched_tokens: 16, ..test_config() })?;
        assert_eq!(tokens(&together(&chunked.handle, &params)?), want, "16-token budget changed the output");
        chunked.handle.shutdown();

        let whole = start(&model, &EngineConfig { max_num_batched_tokens: 2048, ..test_config() })?;
        assert_eq!(tokens(&together(&whole.handle, &params)?), want, "2048-token budget changed the output");
        whole.handle.shutdown();

        // 12 blocks of 16 tokens cannot hold 8 sequences of ~35 tokens: preemption must happen.
        let small = start(&model, &EngineConfig { num_blocks_override: Some(12), ..test_config() })?;
        assert_eq!(tokens(&together(&small.handle, &params)?), want, "preemption changed the output");
        assert!(small.handle.stats().preemptions.load(Ordering::Relaxed) > 0, "no preemption happened");
        wait_all_blocks_free(&small.handle)?;
        small.handle.shutdown();
    }
    wait_all_blocks_free(h)?;
    Ok(())
}

#[test]
fn n_choices_share_the_prompt_and_free_their_blocks() -> Result<()> {
    let engine = start(&smollm2()?, &test_config())?;
    let h = &engine.handle;
    let one = run(h, Prompt::Text(PROMPTS[1].into()), greedy(20))?;
    let two = run(h, Prompt::Text(PROMPTS[1].into()), SamplingParams { n: 2, ..greedy(20) })?;
    assert_eq!(two.len(), 2);
    assert_eq!(two[0].tokens, one[0].tokens, "greedy choice 0 differs from n=1");
    assert_eq!(two[1].tokens, one[0].tokens, "greedy choice 1 differs from n=1");
    let three = run(h, Prompt::Text(PROMPTS[1].into()), SamplingParams { n: 3, ..seeded(20, 3) })?;
    let again = run(h, Prompt::Text(PROMPTS[1].into()), SamplingParams { n: 3, ..seeded(20, 3) })?;
    assert_eq!(three, again, "same seed, different n=3 outputs");
    assert!(three[0].tokens != three[1].tokens || three[1].tokens != three[2].tokens, "seeded choices all identical");
    wait_all_blocks_free(h)?;
    Ok(())
}

#[test]
fn blocks_free_after_finish_stop_and_abort() -> Result<()> {
    let engine = start(&smollm2()?, &test_config())?;
    let h = &engine.handle;
    let done = run(h, Prompt::Text(PROMPTS[0].into()), greedy(8))?;
    assert_eq!(done[0].finish_reason, Some("length"));
    wait_all_blocks_free(h)?;

    // A stop string: never emitted, finish_reason stop, blocks freed.
    let full = run(h, Prompt::Text(PROMPTS[3].into()), greedy(16))?.remove(0);
    let stop_at = full.text.find('8').expect("the model counts past 8");
    let stopped =
        run(h, Prompt::Text(PROMPTS[3].into()), SamplingParams { stop: vec!["8".into()], ..greedy(16) })?.remove(0);
    assert_eq!(stopped.text, full.text[..stop_at]);
    assert_eq!(stopped.finish_reason, Some("stop"));
    wait_all_blocks_free(h)?;

    // Aborted by dropping the stream mid-generation.
    let mut s = h.generate(Prompt::Text(PROMPTS[4].into()), SamplingParams { ignore_eos: true, ..greedy(2000) })?;
    s.blocking_next().expect("first delta")?;
    drop(s);
    wait_all_blocks_free(h)?;
    Ok(())
}

#[test]
fn bad_input_is_a_typed_error() -> Result<()> {
    let engine = start(&smollm2()?, &test_config())?;
    let h = &engine.handle;
    let too_long = Prompt::Tokens(vec![17; h.info().max_model_len + 1]);
    let e = h.generate(too_long, greedy(4)).err().expect("context overflow accepted");
    assert!(matches!(e, kiln_inference::EngineError::ContextLengthExceeded { .. }), "{e:?}");
    let e = h
        .generate(Prompt::Text("hi".into()), SamplingParams { logprobs: true, top_logprobs: 21, ..greedy(4) })
        .err()
        .expect("top_logprobs 21 accepted");
    assert!(matches!(e, kiln_inference::EngineError::InvalidParam { param: "top_logprobs", .. }), "{e:?}");
    let e = h.generate(Prompt::Tokens(vec![10_000_000]), greedy(4)).err().expect("bad token id accepted");
    assert!(matches!(e, kiln_inference::EngineError::InvalidParam { param: "prompt", .. }), "{e:?}");
    assert!(kiln_inference::loader::resolve("/no/such/model.gguf").is_err());
    Ok(())
}
