//! The engine's agent-facing capabilities on the real SmolLM2 model: prefix caching (a hit gives
//! exactly the tokens and logprobs of a miss, with chunked prefill, `n > 1`, and eviction in a
//! tiny cache), sessions (a turn prefills only what was appended, and gives the tokens of the
//! same conversation sent fresh with caching off), fork (children share the prefix, computed
//! once), admission control (excess requests fail at once with `Overloaded`), and typed errors
//! for bad session use. Every test ends with every block free or evictable.

use anyhow::{ensure, Result};
use kiln_inference::engine::{EngineConfig, EngineHandle, Prompt};
use kiln_inference::{EngineError, SamplingParams, SessionInput};
use kiln_tests::{collect, collect_cached, run, smollm2, start, test_config, wait_all_blocks_free, Output};
use std::sync::atomic::Ordering;

/// A system prompt long enough to span many 16-token blocks (~300 tokens).
fn system_prompt() -> String {
    rules(6)
}

/// `k` x 5 short rules, ~50 tokens per k.
fn rules(k: usize) -> String {
    let facts = [
        "The kiln is fired at dawn.",
        "Glazes are mixed on Tuesdays.",
        "The studio cat is named Ember.",
        "Porcelain needs the hottest firing.",
        "Orders ship on Fridays.",
    ];
    (0..k).flat_map(|i| facts.iter().map(move |f| format!("Rule {i}: {f}"))).collect::<Vec<_>>().join(" ")
}

fn chat(system: &str, user: &str) -> String {
    format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}

fn params(seed: Option<u64>, n: usize) -> SamplingParams {
    let temperature = if seed.is_some() { 0.8 } else { 0.0 };
    SamplingParams { temperature, seed, max_tokens: Some(12), logprobs: true, top_logprobs: 3, n, ..Default::default() }
}

fn counter(h: &EngineHandle, f: impl Fn(&kiln_inference::engine::EngineStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(h.stats()).load(Ordering::Relaxed)
}

/// Runs `prompt` and returns its outputs and how many prompt tokens were cached.
fn run_cached(h: &EngineHandle, prompt: &str, p: SamplingParams) -> Result<(Vec<Output>, usize)> {
    collect_cached(&mut h.generate(Prompt::Text(prompt.to_string()), p)?)
}

/// A cache hit gives bit-identical tokens and logprobs to a cold run and to caching off, with
/// whole and chunked prefill, greedy and seeded, n = 1 and n = 3.
#[test]
fn a_prefix_cache_hit_gives_exactly_the_output_of_a_miss() -> Result<()> {
    let model = smollm2()?;
    let off = start(&model, &EngineConfig { enable_prefix_caching: false, ..test_config() })?;
    let on = start(&model, &test_config())?;
    let chunked = start(&model, &EngineConfig { max_num_batched_tokens: 16, ..test_config() })?;
    let system = system_prompt();
    for (seed, n) in [(None, 1), (Some(11), 1), (Some(5), 3)] {
        for user in ["Who is Ember?", "When do orders ship?"] {
            let prompt = chat(&system, user);
            let (want, cached_off) = run_cached(&off.handle, &prompt, params(seed, n))?;
            ensure!(cached_off == 0, "caching off reported {cached_off} cached tokens");
            for h in [&on.handle, &chunked.handle] {
                let (first, _) = run_cached(h, &prompt, params(seed, n))?;
                let (second, cached) = run_cached(h, &prompt, params(seed, n))?;
                let prompt_len = h.tokenizer().encode_prompt(&prompt, true)?.len();
                ensure!(cached >= prompt_len - 16 && cached < prompt_len, "cached {cached} of {prompt_len}");
                ensure!(first == want && second == want, "a cache hit changed the output ({seed:?}, n={n})");
            }
        }
    }
    let hits = counter(&on.handle, |s| &s.prefix_cache_hits);
    ensure!(hits > 0 && hits <= counter(&on.handle, |s| &s.prefix_cache_queries));
    for h in [&off.handle, &on.handle, &chunked.handle] {
        wait_all_blocks_free(h)?;
    }
    Ok(())
}

/// In a cache of 12 blocks (192 tokens) every request evicts others' cached blocks, and
/// outputs stay those of an uncached run.
#[test]
fn eviction_in_a_tiny_cache_keeps_outputs_exact() -> Result<()> {
    let model = smollm2()?;
    let roomy = start(&model, &EngineConfig { enable_prefix_caching: false, ..test_config() })?;
    let tiny = start(&model, &EngineConfig { num_blocks_override: Some(12), ..test_config() })?;
    // ~120-token prompts: each needs 8 of the 12 blocks, so the cached ones are soon reused.
    let system = rules(2);
    let users = ["What is bisque?", "What is glaze?", "What is a cone?", "What is bisque?", "What is glaze?"];
    for user in users {
        let prompt = chat(&system, user);
        let want = run(&roomy.handle, Prompt::Text(prompt.clone()), params(Some(3), 1))?;
        let got = run(&tiny.handle, Prompt::Text(prompt), params(Some(3), 1))?;
        ensure!(got == want, "eviction changed the output for {user:?}");
    }
    ensure!(counter(&tiny.handle, |s| &s.prefix_cache_evictions) > 0, "the tiny cache never evicted");
    ensure!(counter(&tiny.handle, |s| &s.prefix_cache_hits) > 0, "the tiny cache never hit");
    wait_all_blocks_free(&tiny.handle)
}

/// Runs a conversation through one session: `first` opens it, each of `follow_ups` is appended
/// after the previous output. Every turn must prefill exactly what it appended (plus the
/// previous turn's last token when a length finish left it uncomputed), per the engine's
/// computed-token counter, and produce the tokens of the same conversation sent whole to an
/// engine with caching off.
fn session_loop(model: &std::path::Path, first: &str, follow_ups: &[String]) -> Result<()> {
    let fresh = start(model, &EngineConfig { enable_prefix_caching: false, ..test_config() })?;
    let eng = start(model, &test_config())?;
    let tok = eng.handle.tokenizer().clone();
    let session = eng.handle.session();
    let mut input = tok.encode_prompt(first, true)?;
    let (mut history, mut uncomputed) = (Vec::new(), 0);
    for i in 0..=follow_ups.len() {
        history.extend(&input);
        let computed_before = counter(&eng.handle, |s| &s.computed_tokens);
        let mut stream = session.generate(SessionInput::Append(input.clone()), params(Some(i as u64), 1))?;
        let (outs, cached) = collect_cached(&mut stream)?;
        ensure!(stream.prompt_tokens() == history.len(), "turn {i}: prompt {}", stream.prompt_tokens());
        let out = &outs[0];
        let want = run(&fresh.handle, Prompt::Tokens(history.clone()), params(Some(i as u64), 1))?;
        ensure!(out == &want[0], "turn {i}: the session's output differs from a fresh request");
        let prefilled = history.len() - cached;
        if i > 0 {
            ensure!(
                prefilled == input.len() + uncomputed,
                "turn {i}: prefilled {prefilled} for {} appended",
                input.len()
            );
        }
        // Decoded: each generated token, but a last one a length finish leaves uncomputed.
        uncomputed = usize::from(out.finish_reason == Some("length"));
        let decoded = out.tokens.len() - uncomputed;
        let computed = counter(&eng.handle, |s| &s.computed_tokens) - computed_before;
        ensure!(computed == (prefilled + decoded) as u64, "turn {i}: computed {computed}");
        history.extend(&out.tokens);
        if let Some(next) = follow_ups.get(i) {
            input = tok.encode_prompt(next, true)?;
        }
    }
    ensure!(counter(&eng.handle, |s| &s.parked_sessions) == 1);
    drop(session);
    wait_all_blocks_free(&eng.handle)
}

/// A 4-turn chat on SmolLM2 through a session.
#[test]
fn a_session_prefills_only_what_each_turn_appends() -> Result<()> {
    let turns = ["And when is the kiln fired?", "What about glazes?", "Thanks!"];
    let follow_ups: Vec<String> =
        turns.iter().map(|t| format!("<|im_end|>\n<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n")).collect();
    session_loop(&smollm2()?, &chat(&system_prompt(), "Who is Ember?"), &follow_ups)
}

/// A 6-step tool loop on Qwen2.5-Coder through a session (skipped when the optional model is
/// not fetched): each step appends a tool result.
#[test]
fn a_qwen_tool_loop_in_a_session_prefills_only_the_tool_results() -> Result<()> {
    let Some(model) = kiln_tests::qwen25() else { return Ok(()) };
    let system = "You are a weather assistant. Call get_weather(city) to answer.";
    let first = chat(system, "What is the weather in Oslo, then Paris, Rome, Lima, Cairo and Tokyo?");
    let follow_ups: Vec<String> = (0..5)
        .map(|i| {
            format!(
                "<|im_end|>\n<|im_start|>user\n<tool_response>\n{{\"temperature\": {}, \"step\": {i}}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
                10 + i
            )
        })
        .collect();
    session_loop(&model, &first, &follow_ups)
}

/// A ~1,000-token prefix prefilled once in a session, forked into 4 children that each answer
/// a different question: the prefix is computed once, every child reuses it, and each child's
/// output equals a fresh request with caching off.
#[test]
fn forked_children_share_a_prefix_computed_once() -> Result<()> {
    let model = smollm2()?;
    let fresh = start(&model, &EngineConfig { enable_prefix_caching: false, ..test_config() })?;
    let eng = start(&model, &test_config())?;
    let tok = eng.handle.tokenizer().clone();
    let long_system = [system_prompt(), system_prompt(), system_prompt()].join(" ");
    let prefix = tok.encode_prompt(&format!("<|im_start|>system\n{long_system}<|im_end|>\n"), true)?;
    ensure!(prefix.len() > 900, "prefix of {} tokens", prefix.len());
    let root = eng.handle.session();
    collect(root.prefill(SessionInput::Append(prefix.clone()))?)?;
    ensure!(counter(&eng.handle, |s| &s.computed_tokens) == prefix.len() as u64);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let children = rt.block_on(root.fork(4))?;
    let questions =
        ["Who is Ember?", "When is the kiln fired?", "When do orders ship?", "What needs the hottest firing?"];
    let streams = children
        .iter()
        .zip(questions)
        .map(|(c, q)| {
            let input =
                tok.encode_prompt(&format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"), true)?;
            Ok((c.generate(SessionInput::Append(input.clone()), params(None, 1))?, input))
        })
        .collect::<Result<Vec<_>>>()?;
    for (mut stream, input) in streams {
        let (outs, cached) = collect_cached(&mut stream)?;
        ensure!(cached == prefix.len(), "a child recomputed its prefix (cached {cached})");
        let whole: Vec<u32> = prefix.iter().chain(&input).copied().collect();
        let want = run(&fresh.handle, Prompt::Tokens(whole), params(None, 1))?;
        ensure!(outs == want, "a child's output differs from a fresh request");
    }
    drop((root, children));
    wait_all_blocks_free(&eng.handle)
}

/// With at most 4 requests waiting, 32 submitted at once: the excess fail at once with
/// `Overloaded`, the rest complete, and the rejections are counted.
#[test]
fn admission_control_refuses_what_cannot_wait() -> Result<()> {
    let model = smollm2()?;
    let eng = start(&model, &EngineConfig { max_waiting_seqs: 4, max_num_seqs: 2, ..test_config() })?;
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for i in 0..32 {
        match eng.handle.generate(Prompt::Text(format!("Count to {i}:")), params(None, 1)) {
            Ok(s) => accepted.push(s),
            Err(EngineError::Overloaded) => rejected += 1,
            Err(e) => anyhow::bail!("unexpected error {e}"),
        }
    }
    // 4 may wait and 2 run; a few more fit if early ones finish while the loop submits.
    ensure!(rejected >= 20 && accepted.len() >= 4, "rejected {rejected}, accepted {}", accepted.len());
    ensure!(counter(&eng.handle, |s| &s.rejected_requests) == rejected as u64);
    for s in accepted {
        ensure!(collect(s)?[0].finish_reason.is_some());
    }
    wait_all_blocks_free(&eng.handle)
}

/// Bad session use is a typed error that leaves the session usable and leaks no block: a turn
/// that overflows the context, a second turn while one runs, a fork of a busy session.
#[test]
fn bad_session_use_is_a_typed_error() -> Result<()> {
    let model = smollm2()?;
    let eng = start(&model, &EngineConfig { max_model_len: Some(256), ..test_config() })?;
    let s = eng.handle.session();
    let overflow = vec![42u32; 300];
    match collect(s.generate(SessionInput::Append(overflow), params(None, 1))?) {
        Err(e) => ensure!(e.to_string().contains("context length"), "{e}"),
        Ok(_) => anyhow::bail!("an overflowing turn succeeded"),
    }
    let prompt = eng.handle.tokenizer().encode_prompt(&chat("Be brief.", "Hi"), true)?;
    let running =
        s.generate(SessionInput::Append(prompt.clone()), SamplingParams { max_tokens: Some(40), ..params(None, 1) })?;
    let busy = collect(s.generate(SessionInput::Append(vec![42]), params(None, 1))?);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let fork = rt.block_on(s.fork(2));
    let out = collect(running)?;
    ensure!(!out[0].tokens.is_empty());
    if let Err(e) = &busy {
        ensure!(e.to_string().contains("busy"), "{e}");
    }
    if let Err(e) = &fork {
        ensure!(matches!(e, EngineError::SessionBusy(_)), "{e}");
    }
    ensure!(busy.is_err() || fork.is_err(), "neither the second turn nor the fork saw the session busy");
    drop(fork);
    // Still usable after all that.
    let again = collect(s.generate(SessionInput::Append(vec![]), params(None, 1))?)?;
    ensure!(again[0].finish_reason.is_some());
    drop(s);
    wait_all_blocks_free(&eng.handle)
}
