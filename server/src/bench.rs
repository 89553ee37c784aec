//! `kiln bench`: engine throughput through the real engine handle (the same path the server
//! uses): prefill tokens/s on a 512-token prompt, decode tokens/s at batch 1, aggregate decode
//! tokens/s at several concurrency levels, and peak RSS. Prints one JSON line on stdout so
//! `benches/compare.sh` can put it beside llama.cpp's figures from the same run.

use crate::engine_args::EngineArgs;
use anyhow::{Context, Result};
use clap::Args;
use kiln_inference::engine::{EngineHandle, Prompt};
use kiln_inference::SamplingParams;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Tokens generated per request in the decode measurements.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Concurrency levels of the aggregate decode measurement.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    pub concurrency: Vec<usize>,
    /// Repetitions of the prefill and batch-1 decode measurements (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let engine = a.engine.start()?;
    let h = engine.handle;
    let words = corpus_tokens(&h, a.prefill_tokens + 64 * 17)?;
    // Warm-up: first touches of weights and caches.
    timed(&h, &words[..32], 4)?;
    let prefill = median((0..a.reps).map(|i| timed(&h, &words[i..i + a.prefill_tokens], 1).map(|r| r.total)))?;
    let prefill_tps = a.prefill_tokens as f64 / prefill.as_secs_f64();
    eprintln!("prefill {} tokens: {:.1} tok/s", a.prefill_tokens, prefill_tps);
    let decode = median((0..a.reps).map(|i| timed(&h, &words[i * 16..i * 16 + 16], a.gen_tokens).map(|r| r.decode)))?;
    let decode_tps = (a.gen_tokens - 1) as f64 / decode.as_secs_f64();
    eprintln!("decode batch 1: {decode_tps:.1} tok/s");
    let mut agg = Vec::new();
    for &c in &a.concurrency {
        let t = Instant::now();
        let prompts: Vec<Vec<u32>> = (0..c).map(|i| words[i * 17..i * 17 + 100].to_vec()).collect();
        let threads: Vec<_> = prompts
            .into_iter()
            .map(|p| {
                let h = h.clone();
                let n = a.gen_tokens;
                std::thread::spawn(move || timed(&h, &p, n))
            })
            .collect();
        let mut tokens = 0;
        for th in threads {
            tokens += th.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))??.tokens;
        }
        let tps = tokens as f64 / t.elapsed().as_secs_f64();
        eprintln!("aggregate decode at {c} concurrent: {tps:.1} tok/s");
        agg.push(serde_json::json!({"concurrency": c, "agg_gen_tok_s": tps}));
    }
    let rss = peak_rss_bytes();
    let line = serde_json::json!({
        "engine": "kiln", "model": a.engine.model, "threads": rayon_threads(),
        "prefill_tokens": a.prefill_tokens, "prefill_tok_s": prefill_tps,
        "gen_tokens": a.gen_tokens, "decode_tok_s": decode_tps,
        "aggregate": agg, "peak_rss_bytes": rss,
    });
    println!("{line}");
    h.shutdown();
    Ok(())
}

struct Run {
    total: Duration,
    /// First token to last token.
    decode: Duration,
    tokens: usize,
}

/// Generates exactly `n` tokens (EOS ignored) greedily from `prompt`.
fn timed(h: &EngineHandle, prompt: &[u32], n: usize) -> Result<Run> {
    let params =
        SamplingParams { temperature: 0.0, max_tokens: Some(n), ignore_eos: true, ..SamplingParams::default() };
    let t = Instant::now();
    let mut stream = h.generate(Prompt::Tokens(prompt.to_vec()), params)?;
    let (mut first, mut tokens) = (None, 0);
    while let Some(d) = stream.blocking_next() {
        let d = d?;
        if !d.tokens.is_empty() && first.is_none() {
            first = Some(Instant::now());
        }
        tokens += d.tokens.len();
    }
    let total = t.elapsed();
    Ok(Run { total, decode: first.map_or(total, |f| f.elapsed()), tokens })
}

/// Deterministic natural-ish text, tokenized, at least `n` tokens long.
fn corpus_tokens(h: &EngineHandle, n: usize) -> Result<Vec<u32>> {
    const WORDS: &[&str] = &[
        "time", "year", "people", "way", "day", "world", "school", "state", "family", "student", "group", "country",
        "problem", "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work",
        "number", "night", "point", "home", "water", "room", "story",
    ];
    let mut x: u64 = 42;
    let mut text = String::from("Write a long story that uses these words:");
    let mut ids = Vec::new();
    while ids.len() < n {
        for _ in 0..256 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push(' ');
            text.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
        }
        ids = h.tokenizer().encode(&text, false)?;
    }
    Ok(ids)
}

fn median(xs: impl Iterator<Item = Result<Duration>>) -> Result<Duration> {
    let mut v = xs.collect::<Result<Vec<_>>>()?;
    v.sort();
    v.get(v.len() / 2).copied().context("no repetitions")
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
