//! The memory store on the real all-MiniLM-L6-v2, each case once per backend (`CASE::embedded`:
//! a real qdrant-edge shard on disk; `CASE::remote`: a Qdrant collection over gRPC through
//! `qdrant-client`, served by a real Qdrant when `KILN_TEST_QDRANT_URL` names one (its key from
//! `QDRANT_API_KEY`), else by the test gRPC server over qdrant-edge, `kiln-qdrant-testserver`,
//! which is Qdrant's protocol over Qdrant's engine but not Qdrant): CRUD, paging, TTL, filters;
//! top-10 exactness against brute-force cosine over the same embeddings; scope isolation
//! (property test); keyed-fact conflicts under 8 concurrent writers; durability across a reopen
//! and across `kill -9` of a writing process (for the remote backend the killed process is the
//! kiln side; the Qdrant side keeps running). And the remote backend alone: a Qdrant that is down
//! is `Unavailable` quickly (the embedded store unaffected) and picked up once it answers; a
//! collection of another shape is refused.

use anyhow::{ensure, Context, Result};
use kiln_agent::memory::{
    Memory, MemoryError, MemoryPatch, MemoryStore, NewMemory, RemoteConfig, Scope, SearchMode, SearchQuery,
};
use kiln_inference::embed::EmbedHandle;
use kiln_qdrant_testserver::TestServer;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[macro_use]
#[path = "support/embedder.rs"]
mod embedder;
use embedder::{embedder, model_dir};

/// Which backend a case runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Embedded,
    Remote,
}

/// The Qdrant remote cases talk to: `KILN_TEST_QDRANT_URL`, else one test gRPC server over
/// qdrant-edge per test binary (it outlives every store, like a real server).
fn qdrant_url() -> Result<String> {
    if let Ok(url) = std::env::var("KILN_TEST_QDRANT_URL") {
        return Ok(url);
    }
    static SERVER: OnceLock<Result<TestServer, String>> = OnceLock::new();
    match SERVER.get_or_init(|| TestServer::start().map_err(|e| format!("{e:#}"))) {
        Ok(s) => Ok(s.url()),
        Err(e) => Err(anyhow::anyhow!("starting the test gRPC server over qdrant-edge: {e}")),
    }
}

fn remote_config(url: &str, collection: &str) -> RemoteConfig {
    let mut c = RemoteConfig::new(url);
    c.collection = collection.into();
    c.api_key = std::env::var("QDRANT_API_KEY").ok().filter(|_| std::env::var_os("KILN_TEST_QDRANT_URL").is_some());
    c
}

/// Where one store lives (a directory, or a collection of its own); opening it again gives the
/// same memories. A remote collection is deleted when this is dropped.
struct Place {
    backend: Backend,
    dir: tempfile::TempDir,
    url: String,
    collection: String,
}

impl Place {
    fn new(backend: Backend) -> Result<Self> {
        let (url, collection) = match backend {
            Backend::Embedded => (String::new(), String::new()),
            Backend::Remote => (qdrant_url()?, format!("kiln_test_{}", uuid::Uuid::new_v4().simple())),
        };
        Ok(Self { backend, dir: tempfile::tempdir()?, url, collection })
    }

    async fn open(&self, e: EmbedHandle) -> Result<MemoryStore> {
        Ok(match self.backend {
            Backend::Embedded => MemoryStore::open_embedded(self.dir.path(), e).await?,
            Backend::Remote => MemoryStore::open_remote(remote_config(&self.url, &self.collection), e).await?,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.backend != Backend::Remote {
            return;
        }
        let config = remote_config(&self.url, &self.collection);
        // Its own thread and runtime: drops also run inside async tests.
        let deleted = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let client = qdrant_client::Qdrant::from_url(&config.url)
                    .api_key(config.api_key)
                    .skip_compatibility_check()
                    .build()?;
                client.delete_collection(config.collection).await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = deleted {
            eprintln!("could not delete test collection {}: {e:#}", self.collection);
        }
    }
}

/// Runs the async case `$name(Backend)` as two tests, `$name::embedded` and `$name::remote`.
macro_rules! on_both_backends {
    ($name:ident, $threads:literal) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn embedded() -> Result<()> {
                super::$name(Backend::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn remote() -> Result<()> {
                super::$name(Backend::Remote).await
            }
        }
    };
}

fn scope(s: &str) -> Scope {
    s.parse().expect("scope")
}

fn note(text: &str, metadata: Value) -> NewMemory {
    let Value::Object(metadata) = metadata else { panic!("metadata must be an object") };
    NewMemory { text: text.into(), metadata, ..Default::default() }
}

fn query(q: &str, top_k: usize) -> SearchQuery {
    SearchQuery { query: q.into(), top_k, score_threshold: None, filter: Map::new(), mode: SearchMode::Dense }
}

/// Deterministic pseudo-random numbers (xorshift) so every run writes the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
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
    "network",
    "ribbon",
    "saffron",
    "tunnel",
    "whisper",
    "cathedral",
    "falcon",
    "sapphire",
];

fn sentence(rng: &mut Rng, words: usize) -> String {
    (0..words).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(" ")
}

on_both_backends!(crud_paging_and_filters, 2);
async fn crud_paging_and_filters(backend: Backend) -> Result<()> {
    let e = embedder_or_skip!();
    let place = Place::new(backend)?;
    let store = place.open(e).await?;
    let a = scope("agent:a");
    let added = store
        .add(
            &a,
            vec![
                note("The user's favourite colour is green", json!({"topic": "prefs", "n": 1})),
                note("The deploy target is eu-west-3", json!({"topic": "ops", "n": 2})),
                note("Coffee is served at nine", json!({"topic": "office", "n": 3, "flag": true})),
            ],
        )
        .await?;
    ensure!(added.len() == 3 && added.iter().all(|m| m.scope == "agent:a"));

    let hits = store.search(&a, query("what colour does the user like?", 3)).await?;
    ensure!(hits[0].memory.text.contains("green"), "best hit: {:?}", hits[0]);
    ensure!(hits.windows(2).all(|w| w[0].score >= w[1].score), "hits are best first");
    let mut q = query("what colour does the user like?", 3);
    q.filter = Map::from_iter([("topic".to_string(), json!("ops"))]);
    let hits = store.search(&a, q).await?;
    ensure!(hits.len() == 1 && hits[0].memory.metadata["topic"] == "ops", "filter: {hits:?}");
    let mut q = query("anything", 3);
    q.filter = Map::from_iter([("n".to_string(), json!(3)), ("flag".to_string(), json!(true))]);
    ensure!(store.search(&a, q).await?.len() == 1, "integer + bool filter");
    let mut q = query("what colour", 3);
    q.score_threshold = Some(0.99);
    ensure!(store.search(&a, q).await?.is_empty(), "a threshold above every score returns nothing");

    // Paging: oldest first, `after` is exclusive, the last page says so.
    let p1 = store.list(&a, None, 2).await?;
    ensure!(p1.data.len() == 2 && p1.has_more);
    let p2 = store.list(&a, p1.last_id.as_deref(), 2).await?;
    ensure!(p2.data.len() == 1 && !p2.has_more);
    let all: Vec<_> = p1.data.iter().chain(&p2.data).map(|m| m.id.clone()).collect();
    ensure!(all == added.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), "stable creation order");

    // Update re-embeds: the new text is what search finds.
    let id = added[1].id.clone();
    let patch = MemoryPatch { text: Some("The deploy target is a volcano observatory".into()), metadata: None };
    let m = store.update(&a, &id, patch).await?;
    ensure!(m.history.len() == 1 && m.history[0].outcome == "updated" && m.metadata["topic"] == "ops");
    let hits = store.search(&a, query("volcano observatory", 1)).await?;
    ensure!(hits[0].memory.id == id && hits[0].score > 0.6, "re-embedded: {hits:?}");

    // Get is scoped: the same id in another scope is not found.
    ensure!(store.get(&a, &id).await?.text.contains("volcano"));
    ensure!(matches!(store.get(&scope("agent:b"), &id).await, Err(MemoryError::NotFound(_))));
    store.delete(&a, &id).await?;
    ensure!(matches!(store.get(&a, &id).await, Err(MemoryError::NotFound(_))));

    // Bad input and unknown scopes.
    let err = store.add(&a, vec![note("   ", json!({}))]).await.unwrap_err();
    ensure!(matches!(err, MemoryError::Invalid { field: "text", .. }), "{err}");
    ensure!(matches!(store.search(&scope("agent:nobody"), query("x", 1)).await, Err(MemoryError::NotFound(_))));
    ensure!(matches!(store.list(&scope("user:nobody"), None, 5).await, Err(MemoryError::NotFound(_))));

    Ok(())
}

on_both_backends!(keyword_and_hybrid_search, 2);
/// Keyword (BM25 with the store's IDF) and hybrid search find a rare identifier that the
/// embedding blurs; the keyword scores are the same on this backend as on the embedded one.
async fn keyword_and_hybrid_search(backend: Backend) -> Result<()> {
    let e = embedder_or_skip!();
    let texts = [
        "Incident INC-48213: the deploy of the billing service failed",
        "Incident INC-48731: the deploy of the search service failed",
        "The billing service deploys every Tuesday",
        "Coffee is served at nine in the lobby",
    ];
    let mut scores = Vec::new();
    let backends = if backend == Backend::Embedded { vec![backend] } else { vec![Backend::Embedded, backend] };
    for b in backends {
        let place = Place::new(b)?;
        let store = place.open(e.clone()).await?;
        let a = scope("agent:a");
        store.add(&a, texts.iter().map(|t| note(t, json!({}))).collect()).await?;
        let mut q = query("INC-48213", 3);
        q.mode = SearchMode::Keyword;
        let hits = store.search(&a, q.clone()).await?;
        // `inc-48213` is the terms `inc` and `48213`: the other incident matches `inc` only.
        ensure!(hits[0].memory.text == texts[0] && hits.len() == 2, "keyword ({b:?}): {hits:?}");
        scores.push(hits.iter().map(|h| h.score).collect::<Vec<_>>());
        q.mode = SearchMode::Hybrid;
        let hits = store.search(&a, q).await?;
        ensure!(hits[0].memory.text == texts[0] && hits.len() == 3, "hybrid ({b:?}): {hits:?}");
    }
    let (embedded, this) = (&scores[0], &scores[scores.len() - 1]);
    let same = embedded.iter().zip(this).all(|(a, b)| (a - b).abs() < 1e-4) && embedded.len() == this.len();
    ensure!(same, "BM25 scores differ across backends: {scores:?}");
    println!("keyword ({backend:?}): BM25 scores {this:?} (embedded {embedded:?})");
    Ok(())
}

on_both_backends!(ttl_and_delete_scope, 2);
async fn ttl_and_delete_scope(backend: Backend) -> Result<()> {
    let e = embedder_or_skip!();
    let place = Place::new(backend)?;
    let store = place.open(e).await?;
    let a = scope("agent:a");
    store.add(&a, vec![note("a note in another scope", json!({}))]).await?;
    // TTL: gone for every reader once expired; purge removes it from disk.
    let b = scope("run:r1");
    let keep = store.add(&b, vec![note("a note that stays", json!({}))]).await?;
    let short = NewMemory { text: "a note that expires".into(), ttl_seconds: Some(1), ..Default::default() };
    let gone = store.add(&b, vec![short]).await?;
    ensure!(gone[0].expires_at_ms.is_some() && store.list(&b, None, 10).await?.data.len() == 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ensure!(store.list(&b, None, 10).await?.data.len() == 1, "expired memory listed");
    let hits = store.search(&b, query("a note that expires", 5)).await?;
    ensure!(hits.len() == 1 && hits[0].memory.id == keep[0].id, "expired memory searched: {hits:?}");
    ensure!(matches!(store.get(&b, &gone[0].id).await, Err(MemoryError::NotFound(_))));
    store.purge_expired().await?;

    // Deleting a scope leaves the others alone.
    store.delete_scope(&a).await?;
    ensure!(matches!(store.list(&a, None, 5).await, Err(MemoryError::NotFound(_))));
    ensure!(store.list(&b, None, 5).await?.data.len() == 1);
    Ok(())
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

on_both_backends!(top10_equals_brute_force_cosine, 2);
/// Top-10 of the store equals brute-force exact cosine over the same embeddings (issue 12's
/// exactness bar: 10,000 memories, 200 queries, >= 99%), after an indexing pass (so HNSW
/// segments, where the engine builds them, are what is checked). `KILN_MEMORY_EXACT_N` shrinks it.
async fn top10_equals_brute_force_cosine(backend: Backend) -> Result<()> {
    let e = embedder_or_skip!();
    let n: usize = std::env::var("KILN_MEMORY_EXACT_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let place = Place::new(backend)?;
    let store = place.open(e).await?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let texts: Vec<String> = (0..n).map(|i| format!("note {i}: {}", sentence(&mut rng, 6))).collect();
    let t = Instant::now();
    let stored = store.add(&scope("global"), texts.iter().map(|t| note(t, json!({}))).collect()).await?;
    let add_s = t.elapsed().as_secs_f64();
    store.index_now().await?;
    let vectors = store.embed(texts.clone()).await?;
    let id_of: Vec<&str> = stored.iter().map(|m| m.id.as_str()).collect();

    let queries: Vec<String> = (0..200).map(|_| sentence(&mut rng, 3)).collect();
    let qvecs = store.embed(queries.clone()).await?;
    let (mut equal, mut overlap) = (0usize, 0usize);
    let t = Instant::now();
    for (q, qv) in queries.iter().zip(&qvecs) {
        let got: HashSet<String> =
            store.search(&scope("global"), query(q, 10)).await?.into_iter().map(|h| h.memory.id).collect();
        let mut scored: Vec<(f32, usize)> = vectors.iter().enumerate().map(|(i, v)| (cosine(qv, v), i)).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let exact: HashSet<String> = scored[..10].iter().map(|&(_, i)| id_of[i].to_string()).collect();
        overlap += got.intersection(&exact).count();
        equal += usize::from(got == exact);
    }
    let search_ms = t.elapsed().as_secs_f64() * 1000.0 / 200.0;
    println!(
        "exactness ({backend:?}): {n} memories (added in {add_s:.1} s), 200 queries: top-10 equal to brute-force cosine on \
         {equal}/200 ({:.1}%), id overlap {:.2}%; {search_ms:.1} ms per search incl. embedding + brute force",
        equal as f64 / 2.0,
        overlap as f64 / 20.0
    );
    ensure!(equal * 100 >= 99 * 200, "top-10 equal on only {equal}/200 queries");
    Ok(())
}

/// Random writes to `agent:a` / `agent:b` from one shared vocabulary (so texts collide across
/// scopes); every search and list in a scope returns only that scope's memories.
mod scope_isolation_property {
    use super::*;
    #[test]
    fn embedded() -> Result<()> {
        super::scope_isolation_property(Backend::Embedded)
    }
    #[test]
    fn remote() -> Result<()> {
        super::scope_isolation_property(Backend::Remote)
    }
}

fn scope_isolation_property(backend: Backend) -> Result<()> {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let Some(e) = embedder() else {
        println!("SKIP: {} missing (scripts/fetch-models.sh embed)", model_dir().display());
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut runner = TestRunner::new(Config { cases: 12, ..Config::default() });
    let writes = prop::collection::vec((any::<bool>(), 0..WORDS.len(), 0..WORDS.len()), 1..40);
    let queries = prop::collection::vec((any::<bool>(), 0..WORDS.len(), 1usize..30), 1..10);
    runner
        .run(&(writes, queries), |(writes, queries)| {
            rt.block_on(isolation_case(backend, &e, &writes, &queries))
                .map_err(|err| TestCaseError::fail(format!("{err:#}")))
        })
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn isolation_case(
    backend: Backend,
    e: &EmbedHandle,
    writes: &[(bool, usize, usize)],
    queries: &[(bool, usize, usize)],
) -> Result<()> {
    let place = Place::new(backend)?;
    let store = place.open(e.clone()).await?;
    let (a, b) = (scope("agent:a"), scope("agent:b"));
    let mut ids: HashMap<bool, HashSet<String>> = HashMap::new();
    for &(in_a, w1, w2) in writes {
        let text = format!("{} {}", WORDS[w1], WORDS[w2]);
        let m = store.add(if in_a { &a } else { &b }, vec![note(&text, json!({"w": WORDS[w1]}))]).await?;
        ids.entry(in_a).or_default().insert(m[0].id.clone());
    }
    for &(in_a, w, k) in queries {
        let (s, mine) = (if in_a { &a } else { &b }, ids.get(&in_a));
        let Some(mine) = mine else {
            ensure!(matches!(store.search(s, query(WORDS[w], k)).await, Err(MemoryError::NotFound(_))));
            continue;
        };
        let hits = store.search(s, query(WORDS[w], k)).await?;
        ensure!(hits.len() == k.min(mine.len()), "{} hits for top_k {k} of {}", hits.len(), mine.len());
        for h in &hits {
            ensure!(h.memory.scope == s.to_string() && mine.contains(&h.memory.id), "{s} returned {:?}", h.memory);
        }
        let page = store.list(s, None, 1000).await?;
        ensure!(page.data.iter().all(|m| mine.contains(&m.id)) && page.data.len() == mine.len());
    }
    Ok(())
}

on_both_backends!(conflicts_resolve_under_8_concurrent_writers, 4);
/// 8 writers with different priorities write one key in `global` 5 times each, concurrently.
/// The live fact is the highest priority's last write; all 40 writes are in fact + history.
async fn conflicts_resolve_under_8_concurrent_writers(backend: Backend) -> Result<()> {
    let e = embedder_or_skip!();
    let place = Place::new(backend)?;
    let store = place.open(e).await?;
    let g = scope("global");
    let priorities = [1i64, 3, 2, 3, 0, 1, 2, 3];
    let mut tasks = Vec::new();
    for (w, &p) in priorities.iter().enumerate() {
        let (store, g) = (store.clone(), g.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..5 {
                let m = NewMemory {
                    text: format!("the user lives in city {w}-{round}"),
                    key: Some("user.city".into()),
                    priority: p,
                    ..Default::default()
                };
                store.add(&g, vec![m]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let page = store.list(&g, None, 100).await?;
    ensure!(page.data.len() == 1, "one live fact per key, got {}", page.data.len());
    let fact = store.get(&g, &page.data[0].id).await?;
    ensure!(fact.priority == 3, "highest priority wins: {fact:?}");
    let mut seen: Vec<String> = fact.history.iter().map(|h| h.text.clone()).collect();
    seen.push(fact.text.clone());
    let expected: HashSet<String> =
        (0..8).flat_map(|w| (0..5).map(move |r| format!("the user lives in city {w}-{r}"))).collect();
    ensure!(seen.len() == 40 && seen.iter().cloned().collect::<HashSet<_>>() == expected, "history lost writes");
    // Among the winners' priority, the live version is the last written.
    let last_top = fact.history.iter().filter(|h| h.priority == 3).map(|h| h.written_at_ms).max().unwrap_or(0);
    ensure!(fact.updated_at_ms >= last_top, "a later equal-priority write lost");
    ensure!(fact.history.iter().all(|h| h.priority <= 3));
    ensure!(store.get(&g, &fact.id).await? == fact, "reads are deterministic");
    // A later lower-priority write is rejected and recorded, not lost.
    let low = NewMemory { text: "city low".into(), key: Some("user.city".into()), priority: 0, ..Default::default() };
    let after = &store.add(&g, vec![low]).await?[0];
    ensure!(after.text == fact.text && after.history.last().is_some_and(|h| h.outcome == "rejected"));
    println!(
        "conflicts ({backend:?}): 8 writers x 5 writes -> live fact {:?} with {} history entries",
        fact.text,
        fact.history.len()
    );
    Ok(())
}

on_both_backends!(every_acknowledged_memory_survives_reopen, 2);
async fn every_acknowledged_memory_survives_reopen(backend: Backend) -> Result<()> {
    let e = embedder_or_skip!();
    let place = Place::new(backend)?;
    let (s, g) = (scope("user:u1"), scope("global"));
    let (plain, fact) = {
        let store = place.open(e.clone()).await?;
        let items = (0..300).map(|i| note(&format!("remembered fact number {i}"), json!({"i": i}))).collect();
        let plain = store.add(&s, items).await?;
        let k = |t: &str, p| NewMemory { text: t.into(), key: Some("k".into()), priority: p, ..Default::default() };
        store.add(&g, vec![k("first", 1)]).await?;
        let fact = store.add(&g, vec![k("second", 2)]).await?.remove(0);
        (plain, fact)
    };
    let store = place.open(e).await?;
    for m in &plain {
        ensure!(store.get(&s, &m.id).await? == *m, "{} changed across reopen", m.id);
    }
    ensure!(store.get(&g, &fact.id).await? == fact && fact.history.len() == 1);
    let hits = store.search(&s, query("remembered fact number 42", 1)).await?;
    ensure!(hits[0].memory.text == "remembered fact number 42", "search after reopen: {hits:?}");
    Ok(())
}

/// Child half of the `kill -9` test: writes batches forever, printing each acknowledged id, to
/// the directory `KILN_MEMORY_CHILD_DIR` or the collection `KILN_MEMORY_CHILD_COLLECTION` on
/// `KILN_MEMORY_CHILD_QDRANT_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_child_writer() -> Result<()> {
    let dir = std::env::var_os("KILN_MEMORY_CHILD_DIR");
    let url = std::env::var("KILN_MEMORY_CHILD_QDRANT_URL").ok();
    if dir.is_none() && url.is_none() {
        return Ok(());
    }
    let e = embedder().context("child needs the model")?;
    let store = match (dir, url) {
        (Some(dir), _) => MemoryStore::open_embedded(Path::new(&dir), e).await?,
        (None, Some(url)) => {
            let collection = std::env::var("KILN_MEMORY_CHILD_COLLECTION")?;
            MemoryStore::open_remote(remote_config(&url, &collection), e).await?
        }
        (None, None) => unreachable!("checked above"),
    };
    for batch in 0.. {
        let items = (0..10).map(|i| note(&format!("child write {batch}-{i}"), json!({}))).collect();
        for m in store.add(&scope("agent:child"), items).await? {
            println!("ACK {}", m.id);
        }
    }
    Ok(())
}

mod kill_9_loses_no_acknowledged_memory {
    use super::*;
    #[test]
    fn embedded() -> Result<()> {
        super::kill_9_loses_no_acknowledged_memory(Backend::Embedded)
    }
    #[test]
    fn remote() -> Result<()> {
        super::kill_9_loses_no_acknowledged_memory(Backend::Remote)
    }
}

/// A process writing memories is killed with SIGKILL after >= 200 acknowledgements; reopening
/// the store (the directory, or the collection on the still-running Qdrant side) finds every
/// acknowledged memory.
fn kill_9_loses_no_acknowledged_memory(backend: Backend) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let Some(e) = embedder() else {
        println!("SKIP: {} missing (scripts/fetch-models.sh embed)", model_dir().display());
        return Ok(());
    };
    let place = Place::new(backend)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--exact", "durability_child_writer", "--nocapture", "--test-threads=1"]);
    match backend {
        Backend::Embedded => cmd.env("KILN_MEMORY_CHILD_DIR", place.dir.path()),
        Backend::Remote => {
            cmd.env("KILN_MEMORY_CHILD_QDRANT_URL", &place.url).env("KILN_MEMORY_CHILD_COLLECTION", &place.collection)
        }
    };
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let mut acked = Vec::new();
    let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    for line in lines {
        if let Some(id) = line?.strip_prefix("ACK ") {
            acked.push(id.to_string());
        }
        if acked.len() >= 200 {
            break;
        }
    }
    child.kill()?; // SIGKILL on Unix: no destructor, no flush runs
    child.wait()?;
    ensure!(acked.len() >= 200, "child stopped after {} acks", acked.len());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let missing = rt.block_on(async {
        let store = place.open(e).await?;
        let mut missing = 0;
        for id in &acked {
            let found: Result<Memory, _> = store.get(&scope("agent:child"), id).await;
            missing += usize::from(found.is_err());
        }
        anyhow::Ok(missing)
    })?;
    println!("kill -9 ({backend:?}): {} acknowledged memories, {missing} missing after reopen", acked.len());
    ensure!(missing == 0, "{missing} acknowledged memories lost");
    Ok(())
}

on_both_backends!(memory_tools_are_bound_to_their_agents_scope, 2);
/// The agent tools `memory_store` / `memory_search`: bound to one agent's scope, a fact stored by
/// agent `a` is found by `a` (keyed facts resolve as the store does) and never by agent `b`; an
/// agent with nothing stored gets an empty list, not an error.
async fn memory_tools_are_bound_to_their_agents_scope(backend: Backend) -> Result<()> {
    use kiln_agent::tools::memory::{bound, SEARCH, STORE};
    use kiln_agent::tools::{invoke, CallLimits};
    let e = embedder_or_skip!();
    let place = Place::new(backend)?;
    let store = place.open(e).await?;
    let tool = |name: &str, agent: &str| bound(name, store.clone(), scope(&format!("agent:{agent}"))).unwrap();
    let limits = CallLimits::default();
    let call = |t, args: Value| async move {
        let out = invoke(&t, args, &limits).await;
        ensure!(!out.is_error, "tool error: {}", out.content);
        Ok::<Value, anyhow::Error>(serde_json::from_str(&out.content)?)
    };
    let stored = call(tool(STORE, "a"), json!({"text": "Ada prefers window seats", "key": "ada.seat"})).await?;
    ensure!(stored["stored"] == true && stored["key"] == "ada.seat", "{stored}");
    call(tool(STORE, "a"), json!({"text": "Ada now prefers aisle seats", "key": "ada.seat"})).await?;
    call(tool(STORE, "a"), json!({"text": "The build server is in Frankfurt"})).await?;
    let found = call(tool(SEARCH, "a"), json!({"query": "where does Ada like to sit", "top_k": 1})).await?;
    let top = &found["memories"][0];
    ensure!(top["text"] == "Ada now prefers aisle seats" && top["key"] == "ada.seat", "{found}");
    let other = call(tool(SEARCH, "b"), json!({"query": "where does Ada like to sit"})).await?;
    ensure!(other == json!({"memories": []}), "agent b sees agent a's memory: {other}");
    let listed = store.list(&scope("agent:a"), None, 10).await?;
    ensure!(listed.data.len() == 2, "one live fact per key plus the unkeyed one: {:?}", listed.data);
    let bad = invoke(&tool(STORE, "a"), json!({"text": "  "}), &limits).await;
    ensure!(bad.is_error && bad.content.contains("non-empty"), "{}", bad.content);
    Ok(())
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A Qdrant that is down: the remote store still opens (kiln starts), every call is
/// `Unavailable` within the client's timeouts (a refused connection: at once), an embedded store
/// beside it works; once a server answers on that address the same store serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_qdrant_down_is_unavailable_then_recovers() -> Result<()> {
    let e = embedder_or_skip!();
    let port = closed_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    let store = MemoryStore::open_remote(remote_config(&url, "kiln_down"), e.clone()).await?;
    ensure!(t.elapsed() < Duration::from_secs(5), "open took {:?}", t.elapsed());
    let a = scope("agent:a");
    for _ in 0..3 {
        let t = Instant::now();
        let err = store.add(&a, vec![note("written while Qdrant is down", json!({}))]).await.unwrap_err();
        let took = t.elapsed();
        ensure!(matches!(&err, MemoryError::Unavailable(m) if m.contains(&url)), "{err:?}");
        ensure!(took < Duration::from_secs(5), "a down Qdrant took {took:?} to report");
        println!("Qdrant down: `{err}` after {} ms", took.as_millis());
    }
    ensure!(matches!(store.search(&a, query("x", 1)).await, Err(MemoryError::Unavailable(_))));
    ensure!(matches!(store.list(&a, None, 5).await, Err(MemoryError::Unavailable(_))));

    // The embedded default is another store entirely: unaffected.
    let dir = tempfile::tempdir()?;
    let local = MemoryStore::open_embedded(dir.path(), e).await?;
    local.add(&a, vec![note("the embedded store still works", json!({}))]).await?;
    ensure!(local.search(&a, query("embedded store", 1)).await?.len() == 1);

    // The server comes up on the address kiln was given: the same store now creates its
    // collection and serves.
    let server = TestServer::start_on(port)?;
    let m = store.add(&a, vec![note("written once Qdrant is up", json!({}))]).await?;
    ensure!(store.get(&a, &m[0].id).await?.text == "written once Qdrant is up");
    drop(server);
    Ok(())
}

/// A collection made for other vectors is refused at open with a message naming the mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_refuses_a_collection_of_another_shape() -> Result<()> {
    use qdrant_client::qdrant::{vectors_config, CreateCollection, Distance, VectorParams, VectorsConfig};
    let e = embedder_or_skip!();
    let place = Place::new(Backend::Remote)?;
    let config = remote_config(&place.url, &place.collection);
    let client = qdrant_client::Qdrant::from_url(&config.url)
        .api_key(config.api_key.clone())
        .skip_compatibility_check()
        .build()?;
    let params = VectorParams { size: 8, distance: Distance::Cosine as i32, ..Default::default() };
    client
        .create_collection(CreateCollection {
            collection_name: place.collection.clone(),
            vectors_config: Some(VectorsConfig { config: Some(vectors_config::Config::Params(params)) }),
            ..Default::default()
        })
        .await?;
    let err = MemoryStore::open_remote(config, e).await.unwrap_err();
    ensure!(err.to_string().contains("8-dimensional") && err.to_string().contains(&place.collection), "{err}");
    println!("refused: {err}");
    Ok(())
}

/// A Qdrant address that accepts connections and never answers (a hung server, a black-holing
/// proxy): each call is `Unavailable` within connect + request timeout, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_qdrant_that_never_answers_is_unavailable_within_its_timeouts() -> Result<()> {
    let e = embedder_or_skip!();
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", silent.local_addr()?);
    // Accepted connections are held open, unread.
    let held = std::thread::spawn(move || silent.incoming().take(8).filter_map(|c| c.ok()).collect::<Vec<_>>());
    let mut config = remote_config(&url, "kiln_silent");
    config.connect_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(1);
    let bound = Duration::from_millis(1500 + 500);
    let t = Instant::now();
    let store = MemoryStore::open_remote(config, e).await?;
    ensure!(t.elapsed() < bound, "open took {:?}", t.elapsed());
    let t = Instant::now();
    let err = store.add(&scope("agent:a"), vec![note("x", json!({}))]).await.unwrap_err();
    ensure!(matches!(&err, MemoryError::Unavailable(m) if m.contains(&url)), "{err:?}");
    ensure!(t.elapsed() < bound, "a silent Qdrant took {:?} to report", t.elapsed());
    println!("silent Qdrant: `{err}` after {} ms", t.elapsed().as_millis());
    drop(held);
    Ok(())
}

/// The collection deleted on the server under a running store: that call is `Unavailable`
/// naming it, the next one recreates the collection and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_collection_deleted_under_the_store_is_recreated() -> Result<()> {
    let e = embedder_or_skip!();
    let place = Place::new(Backend::Remote)?;
    let store = place.open(e).await?;
    let a = scope("agent:a");
    store.add(&a, vec![note("before the collection was deleted", json!({}))]).await?;
    let config = remote_config(&place.url, &place.collection);
    let client =
        qdrant_client::Qdrant::from_url(&config.url).api_key(config.api_key).skip_compatibility_check().build()?;
    client.delete_collection(place.collection.clone()).await?;
    let err = store.add(&a, vec![note("while it is gone", json!({}))]).await.unwrap_err();
    ensure!(matches!(&err, MemoryError::Unavailable(m) if m.contains("is gone")), "{err:?}");
    let m = store.add(&a, vec![note("after it was recreated", json!({}))]).await?;
    ensure!(store.list(&a, None, 10).await?.data.iter().map(|m| &m.id).eq([&m[0].id]), "recreated empty");
    Ok(())
}
