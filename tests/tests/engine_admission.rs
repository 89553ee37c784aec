//! Admission control and `n` on the real SmolLM2 engine: waiting work is bounded in requests and
//! prompt tokens (429-style `Overloaded` only while others wait, `NeverFits` for what no wait
//! can cure), the counts return to zero on every path; a request with `n` starts on one slot,
//! its choices are the same tokens whatever `max_num_seqs` is, and a short request sent during
//! a large `n` runs long before the `n` request ends.

use anyhow::{ensure, Result};
use kiln_inference::engine::{EngineConfig, EngineHandle, Prompt, Waiting};
use kiln_inference::{EngineError, SamplingParams, SessionInput};
use kiln_tests::{collect, smollm2, start, test_config, wait_all_blocks_free};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens: Some(max_tokens), ..SamplingParams::default() }
}

fn seeded(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(11), ..greedy(max_tokens) }
}

/// `len` prompt tokens (ordinary word pieces; their meaning does not matter here).
fn tokens(len: usize) -> Prompt {
    Prompt::Tokens((0..len).map(|i| 1000 + (i % 500) as u32).collect())
}

/// A request that keeps the engine busy until dropped; running (not waiting) once this returns.
fn endless(h: &EngineHandle) -> Result<kiln_inference::TokenStream> {
    let mut s = h.generate(tokens(8), SamplingParams { ignore_eos: true, ..greedy(200) })?;
    s.blocking_next().expect("a first token")?;
    Ok(s)
}

/// Waits (bounded) until nothing counts as waiting.
fn wait_nothing_waiting(h: &EngineHandle) -> Result<()> {
    for _ in 0..300 {
        if h.waiting() == Waiting::default() && h.stats().waiting_tokens.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("still counted as waiting: {:?}", h.waiting())
}

#[test]
fn n_choices_are_the_same_tokens_on_two_slots_as_on_sixteen() -> Result<()> {
    let model = smollm2()?;
    let wide = start(&model, &test_config())?;
    let narrow = start(&model, &EngineConfig { max_num_seqs: 2, ..test_config() })?;
    // Two slots and 4 blocks, 3 of which one choice needs: choices preempt each other too.
    let tight = start(&model, &EngineConfig { max_num_seqs: 2, num_blocks_override: Some(4), ..test_config() })?;
    let prompt = Prompt::Text("Write a short poem about the sea:".into());
    for params in [SamplingParams { n: 8, ..greedy(24) }, SamplingParams { n: 8, ..seeded(24) }] {
        let run = |h: &EngineHandle| collect(h.generate(prompt.clone(), params.clone())?);
        let want = run(&wide.handle)?;
        ensure!(want.len() == 8 && want.iter().all(|o| !o.tokens.is_empty()));
        ensure!(run(&narrow.handle)? == want, "max_num_seqs = 2 changed the choices ({params:?})");
        ensure!(run(&tight.handle)? == want, "a tight cache changed the choices ({params:?})");
    }
    ensure!(tight.handle.stats().preemptions.load(Ordering::Relaxed) > 0, "the tight cache never preempted");
    let distinct = collect(wide.handle.generate(prompt, SamplingParams { n: 8, ..seeded(24) })?)?;
    ensure!(distinct.iter().any(|o| o.tokens != distinct[0].tokens), "seeded choices all identical");
    for e in [&wide, &narrow, &tight] {
        wait_all_blocks_free(&e.handle)?;
        wait_nothing_waiting(&e.handle)?;
    }
    Ok(())
}

/// `n = 16` on 4 slots runs in waves of choices; a short request sent once it started gets a
/// slot when the first wave ends, not after all 16 choices.
#[test]
fn a_short_request_runs_beside_a_large_n() -> Result<()> {
    let eng = start(&smollm2()?, &EngineConfig { max_num_seqs: 4, ..test_config() })?;
    let h = eng.handle.clone();
    let wide = SamplingParams { n: 16, ignore_eos: true, ..greedy(48) };
    let mut big = h.generate(tokens(16), wide)?;
    big.blocking_next().expect("the n request's first token")?;
    // When each choice of the n request finished.
    let big = std::thread::spawn(move || {
        let mut ends = Vec::new();
        while let Some(d) = big.blocking_next() {
            if d?.finish_reason.is_some() {
                ends.push(Instant::now());
            }
        }
        anyhow::Ok(ends)
    });
    let short = collect(h.generate(tokens(8), greedy(4))?)?;
    let short_done = Instant::now();
    let ends = big.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    ensure!(short[0].tokens.len() == 4 && ends.len() == 16, "{} choices ended", ends.len());
    let before = ends.iter().filter(|&&t| t < short_done).count();
    ensure!(before <= 8, "the short request waited for {before} of the 16 choices to end");
    wait_all_blocks_free(&h)
}

#[test]
fn waiting_work_is_bounded_in_tokens_and_what_never_fits_is_never_fits() -> Result<()> {
    let cfg = EngineConfig {
        max_num_seqs: 1,
        max_waiting_tokens: Some(64),
        num_blocks_override: Some(16), // 256 token slots
        ..test_config()
    };
    let eng = start(&smollm2()?, &cfg)?;
    let h = &eng.handle;
    let never = |r: Result<_, EngineError>, field: &str| match r {
        Err(EngineError::NeverFits { param, .. }) if param == field => Ok(()),
        Err(e) => anyhow::bail!("expected NeverFits({field}), got {e}"),
        Ok(_) => anyhow::bail!("expected NeverFits({field}), accepted"),
    };
    // Nothing waits: a prompt as large as the bound gets in.
    let first = h.generate(tokens(64), greedy(1))?;
    collect(first)?;
    never(h.generate(tokens(65), greedy(1)).map(drop), "prompt")?;
    never(h.generate_many(vec![tokens(40), tokens(40)], greedy(1)).map(drop), "prompt")?;
    never(h.generate(tokens(100), greedy(200)).map(drop), "max_tokens")?;
    never(h.generate(tokens(100), SamplingParams { max_tokens: None, ..greedy(1) }).map(drop), "max_tokens")?;
    // One runs; then 40 + 20 tokens may wait, 30 more may not (until something starts).
    let running = endless(h)?;
    let _a = h.generate(tokens(40), greedy(1))?;
    let _b = h.generate(tokens(20), greedy(1))?;
    ensure!(h.waiting() == Waiting { requests: 2, tokens: 60 }, "{:?}", h.waiting());
    match h.generate(tokens(30), greedy(1)) {
        Err(EngineError::Overloaded) => {}
        other => anyhow::bail!("expected Overloaded, got {:?}", other.map(drop)),
    }
    ensure!(h.stats().rejected_requests.load(Ordering::Relaxed) == 1);
    ensure!(h.stats().waiting_tokens.load(Ordering::Relaxed) == 60);
    drop(running);
    wait_nothing_waiting(h)?;
    wait_all_blocks_free(h)
}

/// The waiting counts return to zero whichever way a waiting request ends: cancelled, refused
/// on the engine thread, finished, or still queued at shutdown.
#[test]
fn admission_counts_return_to_zero_on_every_path() -> Result<()> {
    let model = smollm2()?;
    let eng = start(&model, &EngineConfig { max_num_seqs: 1, ..test_config() })?;
    let h = &eng.handle;
    let running = endless(h)?;
    let waiting: Vec<_> = (0..3).map(|_| h.generate(tokens(30), greedy(2))).collect::<Result<_, _>>()?;
    ensure!(h.waiting() == Waiting { requests: 3, tokens: 90 }, "{:?}", h.waiting());
    drop(waiting); // cancelled before running
    wait_nothing_waiting(h)?;
    // Refused on the engine thread: a session turn while another turn of it runs.
    let s = h.session();
    let turn = s.generate(SessionInput::Append(vec![1000; 12]), greedy(2))?;
    let busy = s.generate(SessionInput::Append(vec![1001; 5]), greedy(2))?;
    ensure!(collect(busy).is_err(), "a second turn of a busy session ran");
    let queued = h.generate(tokens(10), greedy(2))?;
    drop(running);
    ensure!(collect(turn)?[0].tokens.len() == 2);
    ensure!(collect(queued)?[0].tokens.len() == 2);
    wait_nothing_waiting(h)?;
    drop(s);
    // Shutdown with requests still waiting: they end with an error and are no longer counted.
    let running = endless(h)?;
    let stranded: Vec<_> = (0..3).map(|_| h.generate(tokens(20), greedy(2))).collect::<Result<_, _>>()?;
    h.shutdown();
    for s in stranded {
        ensure!(collect(s).is_err(), "a waiting request outlived shutdown");
    }
    ensure!(collect(running).is_err());
    wait_nothing_waiting(h)
}
