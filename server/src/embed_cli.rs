//! `kiln embed`: embeds texts through the real embedding engine and prints the vectors (one
//! line of numbers per text, or `--json`). `kiln embed-bench`: sentences/s of the in-process
//! engine on batches of texts from a JSON file, for `benches/embed_compare.sh`.

use anyhow::{ensure, Context, Result};
use clap::Args;
use kiln_inference::embed::{
    load_embedder, DensePrecision, EmbedConfig, EmbedHandle, EmbedInput, EmbedOptions, Embedding,
};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// A sentence-transformers model directory (config.json, model.safetensors, tokenizer.json,
    /// modules.json, ...) or a Hugging Face id.
    #[arg(long, env = "KILN_EMBEDDING_MODEL")]
    pub model: String,
    /// Print one JSON document (OpenAI embeddings response shape) instead of plain numbers.
    #[arg(long)]
    pub json: bool,
    /// Keep this many leading components, then L2-renormalize.
    #[arg(long)]
    pub dimensions: Option<usize>,
    /// Fail on inputs longer than the model's max_seq_length instead of cutting them.
    #[arg(long)]
    pub no_truncate: bool,
    /// Matmul precision (default: the fastest this CPU runs natively).
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub precision: Option<String>,
    /// Texts to embed; none: one per line of stdin.
    pub texts: Vec<String>,
}

fn precision(p: &Option<String>) -> Option<DensePrecision> {
    p.as_deref().map(|p| if p == "bf16" { DensePrecision::Bf16 } else { DensePrecision::F32 })
}

fn start(model: &str, precision_flag: &Option<String>) -> Result<EmbedHandle> {
    let cfg = EmbedConfig { precision: precision(precision_flag), ..EmbedConfig::default() };
    Ok(load_embedder(model, &cfg)?.handle)
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let texts = if a.texts.is_empty() {
        std::io::stdin().lock().lines().collect::<std::io::Result<Vec<String>>>()?
    } else {
        a.texts.clone()
    };
    let h = start(&a.model, &a.precision)?;
    let opts = EmbedOptions { dimensions: a.dimensions, truncate: !a.no_truncate };
    let inputs = texts.into_iter().map(EmbedInput::Text).collect();
    let out = h.embed(inputs, &opts)?;
    let mut stdout = std::io::stdout().lock();
    if a.json {
        writeln!(stdout, "{}", serde_json::to_string(&JsonOut::new(&h.info().name, &out))?)?;
    } else {
        for e in &out {
            let line: Vec<String> = e.vector.iter().map(|x| format!("{x:.7}")).collect();
            writeln!(stdout, "{}", line.join(" "))?;
        }
    }
    Ok(())
}

/// The OpenAI embeddings response shape, serialized from f32 (not through `serde_json::Value`'s
/// f64) so numbers print in their shortest form.
#[derive(serde::Serialize)]
struct JsonOut<'a> {
    object: &'static str,
    data: Vec<JsonItem<'a>>,
    model: &'a str,
    usage: JsonUsage,
}

#[derive(serde::Serialize)]
struct JsonItem<'a> {
    object: &'static str,
    index: usize,
    embedding: &'a [f32],
}

#[derive(serde::Serialize)]
struct JsonUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

impl<'a> JsonOut<'a> {
    fn new(model: &'a str, out: &'a [Embedding]) -> Self {
        let data = out
            .iter()
            .enumerate()
            .map(|(index, e)| JsonItem { object: "embedding", index, embedding: &e.vector })
            .collect();
        let tokens = out.iter().map(|e| e.tokens).sum();
        JsonOut { object: "list", data, model, usage: JsonUsage { prompt_tokens: tokens, total_tokens: tokens } }
    }
}

#[derive(Args, Debug)]
pub struct EmbedBenchArgs {
    /// The embedding model (as for `kiln embed`).
    #[arg(long, env = "KILN_EMBEDDING_MODEL")]
    pub model: String,
    /// A JSON array of texts; the benchmark embeds them in consecutive batches.
    #[arg(long)]
    pub input: std::path::PathBuf,
    /// Texts per request.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Measure for at least this long (after one warm-up pass).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Matmul precision (default: the fastest this CPU runs natively).
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub precision: Option<String>,
    /// A label for the JSON line.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// Prints one JSON line: sentences/s, tokens/s, batch latency percentiles.
pub fn bench(a: EmbedBenchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let texts: Vec<String> = serde_json::from_str(&text).context("--input must be a JSON array of strings")?;
    ensure!(a.batch > 0 && texts.len() >= a.batch, "need at least --batch texts");
    let h = start(&a.model, &a.precision)?;
    let batches: Vec<Vec<EmbedInput>> =
        texts.chunks_exact(a.batch).map(|c| c.iter().cloned().map(EmbedInput::Text).collect()).collect();
    let opts = EmbedOptions::default();
    for b in batches.iter().take(2) {
        h.embed(b.clone(), &opts)?; // warm-up: first touches of weights and buffers
    }
    let (mut lat, mut sentences, mut tokens) = (Vec::new(), 0usize, 0usize);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs_f64(a.seconds) || lat.len() < 3 {
        let b = &batches[lat.len() % batches.len()];
        let t = Instant::now();
        let out = h.embed(b.clone(), &opts)?;
        lat.push(t.elapsed().as_secs_f64());
        sentences += out.len();
        tokens += out.iter().map(|e| e.tokens).sum::<usize>();
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let doc = serde_json::json!({
        // An explicit precision is a variant of its own in benches/embed_compare.sh's table.
        "engine": a.precision.as_deref().map_or("kiln".to_string(), |p| format!("kiln-{p}")),
        "label": a.label,
        "batch": a.batch,
        "precision": format!("{:?}", h.info().precision).to_lowercase(),
        "sentences_per_s": sentences as f64 / secs,
        "tokens_per_s": tokens as f64 / secs,
        "mean_tokens": tokens as f64 / sentences as f64,
        "batch_ms_p50": pct(0.5) * 1e3,
        "batch_ms_p95": pct(0.95) * 1e3,
    });
    eprintln!("kiln {}: {:.1} sentences/s ({:.0} tokens/s)", a.label, sentences as f64 / secs, tokens as f64 / secs);
    println!("{doc}");
    Ok(())
}
