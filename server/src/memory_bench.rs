//! `kiln memory-bench`: the memory store's speed on the embedded backend, each figure beside its
//! peer in the same run (issue 12's speed bars): adding 1,000 short memories in one batch against
//! the raw embedding throughput `kiln embed-bench` measures (batches of 32 straight into the
//! engine); search latency one query at a time (embedding included) at `--memories`; and the time
//! to reopen the store at that size. Prints one JSON line. Must not: be a test (timings are not
//! asserted here; `benches/memory.sh` reads the line).

use anyhow::{ensure, Result};
use clap::Args;
use kiln_agent::memory::{MemoryStore, NewMemory, Scope, SearchMode, SearchQuery};
use kiln_inference::embed::{load_embedder, EmbedConfig, EmbedHandle, EmbedInput, EmbedOptions};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct MemoryBenchArgs {
    /// The embedding model (as for `kiln embed`).
    #[arg(long, env = "KILN_EMBEDDING_MODEL")]
    pub model: String,
    /// Memories in the store for the search and reopen figures.
    #[arg(long, default_value_t = 100_000)]
    pub memories: usize,
    /// Queries per search mode, sent one at a time.
    #[arg(long, default_value_t = 200)]
    pub queries: usize,
    /// Build the HNSW index (qdrant-edge's optimizers) after filling, before searching.
    #[arg(long)]
    pub index: bool,
    /// Where the store lives (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

const WORDS: &[&str] = &[
    "apple",
    "river",
    "engine",
    "quantum",
    "violin",
    "mountain",
    "database",
    "coffee",
    "planet",
    "garden",
    "rocket",
    "poetry",
    "harbor",
    "silicon",
    "forest",
    "thunder",
    "library",
    "bicycle",
    "glacier",
    "market",
    "kernel",
    "orchid",
    "desert",
    "compiler",
    "lantern",
    "meadow",
    "satellite",
    "pepper",
    "canyon",
    "museum",
    "tiger",
    "volcano",
];

/// Short memories ("note 17: glacier pepper ..."), the same on every run.
fn texts(from: usize, n: usize, words: usize) -> Vec<String> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ from as u64;
    let mut word = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        WORDS[(state % WORDS.len() as u64) as usize]
    };
    (from..from + n)
        .map(|i| format!("note {i}: {}", (0..words).map(|_| word()).collect::<Vec<_>>().join(" ")))
        .collect()
}

fn memories(texts: &[String]) -> Vec<NewMemory> {
    texts.iter().map(|t| NewMemory { text: t.clone(), ..Default::default() }).collect()
}

/// Sentences/s of the engine itself on `texts`, as `kiln embed-bench --batch 32` drives it
/// (blocking calls, so off the async workers).
fn raw_embed_rate(h: &EmbedHandle, texts: &[String]) -> Result<f64> {
    tokio::task::block_in_place(|| {
        let opts = EmbedOptions::default();
        let t = Instant::now();
        for chunk in texts.chunks(32) {
            h.embed(chunk.iter().cloned().map(EmbedInput::Text).collect(), &opts)?;
        }
        Ok(texts.len() as f64 / t.elapsed().as_secs_f64())
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentiles(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let p = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    json!({"p50_ms": p(0.5), "p95_ms": p(0.95), "max_ms": p(1.0)})
}

pub fn run(a: MemoryBenchArgs) -> Result<()> {
    ensure!(a.memories >= 2_000 && a.queries > 0, "need --memories >= 2000 and --queries > 0");
    let h = load_embedder(&a.model, &EmbedConfig::default())?.handle;
    let tmp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let doc = rt.block_on(measure(&a, h, &dir))?;
    eprintln!("{}", serde_json::to_string_pretty(&doc)?);
    println!("{doc}");
    Ok(())
}

async fn measure(a: &MemoryBenchArgs, h: EmbedHandle, dir: &Path) -> Result<Value> {
    let store = MemoryStore::open_embedded(dir, h.clone()).await?;
    let scope: Scope = "global".parse()?;
    raw_embed_rate(&h, &texts(0, 256, 6))?; // warm-up: first touches of weights and buffers
                                            // Three rounds, alternating the peer and the store on fresh texts; medians.
    let (mut raw, mut add) = (Vec::new(), Vec::new());
    for round in 0..3 {
        raw.push(raw_embed_rate(&h, &texts(1_000_000 + round * 1000, 1000, 6))?);
        let batch = texts(round * 1000, 1000, 6);
        let t = Instant::now();
        store.add(&scope, memories(&batch)).await?;
        add.push(1000.0 / t.elapsed().as_secs_f64());
    }
    let (raw, add) = (median(raw), median(add));
    let t = Instant::now();
    for from in (3000..a.memories).step_by(5000) {
        store.add(&scope, memories(&texts(from, 5000.min(a.memories - from), 6))).await?;
    }
    let fill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let indexed = a.index;
    if indexed {
        store.index_now().await?;
    }
    let optimize_s = t.elapsed().as_secs_f64();
    let mut search = Map::new();
    for mode in [SearchMode::Dense, SearchMode::Hybrid, SearchMode::Keyword] {
        search.insert(format!("{mode:?}").to_lowercase(), search_latency(&store, &scope, mode, a.queries).await?);
    }
    drop(store);
    let t = Instant::now();
    let store = MemoryStore::open_embedded(dir, h).await?;
    let reopen_s = t.elapsed().as_secs_f64();
    let listed = store.list(&scope, None, 1).await?.data.len();
    ensure!(listed == 1, "the reopened store lists nothing");
    Ok(json!({
        "memories": a.memories,
        "add_1000": {"memories_per_s": add, "raw_embed_sentences_per_s": raw, "ratio": add / raw},
        "fill_s": fill_s,
        "hnsw": {"built": indexed, "optimize_s": optimize_s},
        "search_one_at_a_time": search,
        "reopen_s": reopen_s,
    }))
}

async fn search_latency(store: &MemoryStore, scope: &Scope, mode: SearchMode, n: usize) -> Result<Value> {
    let mut ms = Vec::with_capacity(n);
    for (i, q) in texts(5_000_000, n, 3).into_iter().enumerate() {
        // Every other query names a stored note, so keyword search has matches to rank.
        let query = if i % 2 == 0 { q } else { format!("note {}", i * 37 % 1000) };
        let sq = SearchQuery { query, top_k: 10, score_threshold: None, filter: Map::new(), mode };
        let t = Instant::now();
        let hits = store.search(scope, sq).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(!hits.is_empty() || mode == SearchMode::Keyword, "a {mode:?} search found nothing");
    }
    Ok(percentiles(ms))
}
