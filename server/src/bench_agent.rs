//! `kiln bench-agent`: what the engine's agent capabilities buy, measured in one run against the
//! same engine without them (two engines on the same weights, caching on and off):
//!
//! - multi-turn chat: a ~2,000-token system prompt and 5 turns, each sent whole (as an OpenAI
//!   client does); time to first token per turn, with and without prefix caching;
//! - tool loop: 6 steps appending a tool result each, through a session vs whole requests with
//!   caching off; latency per step;
//! - fork: a ~1,000-token prefix prefilled once and forked into 4 children decoding together, vs
//!   the 4 whole prompts run one after another without caching; aggregate tokens/s;
//! - fairness: a 2-token request sent a third into a ~4,000-token prompt's prefill: its time to
//!   first token against that prefill's time alone, and how much the long prefill slowed.
//!
//! Prints one JSON line on stdout (progress on stderr). Greedy decoding, EOS ignored, so both
//! sides do the same work.

use crate::engine_args::EngineArgs;
use anyhow::{Context, Result};
use clap::Args;
use kiln_inference::engine::{EngineHandle, Prompt};
use kiln_inference::{SamplingParams, SessionInput, TokenStream};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchAgentArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Tokens generated per turn, step or child.
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
}

pub fn run(a: BenchAgentArgs) -> Result<()> {
    let mut off_args = a.engine.clone();
    off_args.no_prefix_caching = true;
    let mut on_args = a.engine.clone();
    on_args.no_prefix_caching = false;
    let on = on_args.start()?.handle;
    let off = off_args.start()?.handle;
    warm(&on)?;
    warm(&off)?;
    let chat = multi_turn(&on, &off, a.gen_tokens)?;
    let tools = tool_loop(&on, &off, a.gen_tokens)?;
    let fork = fork(&on, &off, a.gen_tokens)?;
    let fair = fairness(&off)?;
    let out = json!({"engine": "kiln", "model": a.engine.model, "multi_turn": chat, "tool_loop": tools, "fork": fork,
                     "fairness": fair});
    println!("{out}");
    on.shutdown();
    off.shutdown();
    Ok(())
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens: Some(n), ignore_eos: true, ..SamplingParams::default() }
}

fn warm(h: &EngineHandle) -> Result<()> {
    drain(h.generate(Prompt::Text("Hello".into()), greedy(4))?).map(|_| ())
}

/// Drains a stream; returns (time to first token from now, tokens generated).
fn drain(mut s: TokenStream) -> Result<(Duration, Vec<u32>)> {
    let t = Instant::now();
    let (mut ttft, mut tokens) = (None, Vec::new());
    while let Some(d) = s.blocking_next() {
        let d = d?;
        if !d.tokens.is_empty() && ttft.is_none() {
            ttft = Some(t.elapsed());
        }
        tokens.extend(d.tokens);
    }
    Ok((ttft.unwrap_or_else(|| t.elapsed()), tokens))
}

fn encode(h: &EngineHandle, text: &str) -> Result<Vec<u32>> {
    Ok(h.tokenizer().encode_prompt(text, true)?)
}

/// `n` numbered instruction sentences (~25 tokens each).
fn instructions(n: usize) -> String {
    (0..n).map(|i| format!("Rule {i}: answer politely, cite rule {i} when asked, and keep answers short.")).collect()
}

fn multi_turn(on: &EngineHandle, off: &EngineHandle, gen: usize) -> Result<serde_json::Value> {
    let mut conv = format!("<|im_start|>system\n{}<|im_end|>\n", instructions(95));
    let mut rows = Vec::new();
    for (i, q) in ["Hello!", "What is rule 3?", "And rule 40?", "Summarize rule 7.", "Thanks."].iter().enumerate() {
        conv.push_str(&format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"));
        let ids = encode(on, &conv)?;
        let (t_on, out) = drain(on.generate(Prompt::Tokens(ids.clone()), greedy(gen))?)?;
        let (t_off, out_off) = drain(off.generate(Prompt::Tokens(ids.clone()), greedy(gen))?)?;
        anyhow::ensure!(out == out_off, "turn {i}: caching changed the output");
        eprintln!("turn {}: {} tokens, TTFT {:?} cached vs {:?} uncached", i + 1, ids.len(), t_on, t_off);
        rows.push(json!({"turn": i + 1, "prompt_tokens": ids.len(), "ttft_ms_cached": ms(t_on), "ttft_ms_uncached": ms(t_off)}));
        conv.push_str(&on.tokenizer().decode(&out, false)?);
        conv.push_str("<|im_end|>\n");
    }
    let last = rows.last().context("no turns")?;
    let ratio = last["ttft_ms_cached"].as_f64().unwrap_or(0.0) / last["ttft_ms_uncached"].as_f64().unwrap_or(1.0);
    eprintln!("multi-turn: turn-5 TTFT ratio cached/uncached = {ratio:.3}");
    Ok(json!({"turns": rows, "turn5_ttft_ratio": ratio}))
}

fn tool_loop(on: &EngineHandle, off: &EngineHandle, gen: usize) -> Result<serde_json::Value> {
    let session = on.session();
    let mut history = encode(on, &format!("<|im_start|>system\n{}<|im_end|>\n", instructions(40)))?;
    let mut input = history.clone();
    let (mut t_session, mut t_whole) = (Duration::ZERO, Duration::ZERO);
    for step in 0..6 {
        let result = format!(
            "<|im_start|>user\n<tool_response>\n{{\"step\": {step}, \"temperature\": {}}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
            10 + step
        );
        let appended = encode(on, &result)?;
        input.extend(&appended);
        history.extend(&appended);
        let t = Instant::now();
        let (_, out) = drain(session.generate(SessionInput::Append(std::mem::take(&mut input)), greedy(gen))?)?;
        t_session += t.elapsed();
        let t = Instant::now();
        let (_, whole) = drain(off.generate(Prompt::Tokens(history.clone()), greedy(gen))?)?;
        t_whole += t.elapsed();
        anyhow::ensure!(out == whole, "step {step}: the session's output differs from the whole request");
        history.extend(&out);
        input = encode(on, "<|im_end|>\n")?;
        history.extend(&input);
    }
    let (per_session, per_whole) = (ms(t_session) / 6.0, ms(t_whole) / 6.0);
    eprintln!("tool loop: {per_session:.1} ms/step in a session vs {per_whole:.1} ms/step whole, uncached");
    Ok(json!({"steps": 6, "ms_per_step_session": per_session, "ms_per_step_whole_uncached": per_whole,
              "ratio": per_session / per_whole}))
}

fn fork(on: &EngineHandle, off: &EngineHandle, gen: usize) -> Result<serde_json::Value> {
    let prefix = encode(on, &format!("<|im_start|>system\n{}<|im_end|>\n", instructions(40)))?;
    let questions: Vec<Vec<u32>> = (0..4)
        .map(|i| encode(on, &format!("<|im_start|>user\nWhat is rule {i}?<|im_end|>\n<|im_start|>assistant\n")))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    for q in &questions {
        let whole: Vec<u32> = prefix.iter().chain(q).copied().collect();
        drain(off.generate(Prompt::Tokens(whole), greedy(gen))?)?;
    }
    let sequential = t.elapsed();
    let t = Instant::now();
    let root = on.session();
    drain(root.prefill(SessionInput::Append(prefix.clone()))?)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let children = rt.block_on(root.fork(4))?;
    let streams = children
        .iter()
        .zip(&questions)
        .map(|(c, q)| c.generate(SessionInput::Append(q.clone()), greedy(gen)))
        .collect::<Result<Vec<_>, _>>()?;
    let threads: Vec<_> = streams.into_iter().map(|s| std::thread::spawn(move || drain(s))).collect();
    for th in threads {
        th.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
    }
    let forked = t.elapsed();
    let tokens = (4 * gen) as f64;
    let (tps_seq, tps_fork) = (tokens / sequential.as_secs_f64(), tokens / forked.as_secs_f64());
    eprintln!(
        "fork: {} prefix tokens, 4 children: {tps_fork:.1} tok/s forked vs {tps_seq:.1} sequential",
        prefix.len()
    );
    Ok(json!({"prefix_tokens": prefix.len(), "children": 4, "agg_tok_s_forked": tps_fork,
              "agg_tok_s_sequential_uncached": tps_seq, "ratio": tps_fork / tps_seq}))
}

fn fairness(h: &EngineHandle) -> Result<serde_json::Value> {
    let long = encode(h, &instructions(180))?;
    let (alone, _) = drain(h.generate(Prompt::Tokens(long.clone()), greedy(1))?)?;
    let long_stream = h.generate(Prompt::Tokens(long.clone()), greedy(1))?;
    let long_thread = std::thread::spawn(move || drain(long_stream));
    std::thread::sleep(alone / 3);
    let (short_ttft, _) = drain(h.generate(Prompt::Tokens(encode(h, "Hi")?), greedy(1))?)?;
    let (shared, _) = long_thread.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
    let (short_frac, slowdown) = (ms(short_ttft) / ms(alone), ms(shared) / ms(alone) - 1.0);
    eprintln!(
        "fairness: {}-token prefill {alone:?} alone, {shared:?} shared; 2-token request TTFT {short_ttft:?} ({:.1}%)",
        long.len(),
        100.0 * short_frac
    );
    Ok(json!({"long_prompt_tokens": long.len(), "prefill_ms_alone": ms(alone), "prefill_ms_shared": ms(shared),
              "short_ttft_ms": ms(short_ttft), "short_ttft_fraction": short_frac, "long_slowdown": slowdown}))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
