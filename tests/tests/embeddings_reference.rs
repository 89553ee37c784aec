//! The embedding engine on the real all-MiniLM-L6-v2 against sentence-transformers' outputs
//! (`tests/reference/all-minilm-l6-v2.json`): token ids, cosine >= 0.9999, unit norms; and
//! the queue's contract: batching never changes a vector, `dimensions`, option errors, a full
//! queue answers `Overloaded` at once.

use anyhow::{ensure, Context, Result};
use kiln_inference::embed::{load_embedder, DensePrecision, EmbedConfig, EmbedHandle, EmbedInput, EmbedOptions};
use kiln_inference::EngineError;
use kiln_tests::{ids, models_dir, reference};

fn minilm() -> Result<String> {
    let p = models_dir().join("all-minilm-l6-v2");
    ensure!(p.join("model.safetensors").is_file(), "{} missing: run scripts/fetch-models.sh embed", p.display());
    Ok(p.to_str().context("utf-8 path")?.to_string())
}

fn start(cfg: &EmbedConfig) -> Result<EmbedHandle> {
    Ok(load_embedder(&minilm()?, cfg)?.handle)
}

struct Item {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn items() -> Result<Vec<Item>> {
    let r = reference("all-minilm-l6-v2.json")?;
    let items = r["items"].as_array().context("items")?;
    items
        .iter()
        .map(|i| {
            let embedding = i["embedding"]
                .as_array()
                .context("embedding")?
                .iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect();
            Ok(Item { text: i["text"].as_str().context("text")?.to_string(), ids: ids(&i["ids"]), embedding })
        })
        .collect()
}

fn text(t: &str) -> EmbedInput {
    EmbedInput::Text(t.to_string())
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() / (norm(a) * norm(b))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn one(h: &EmbedHandle, input: EmbedInput, opts: &EmbedOptions) -> Result<Vec<f32>> {
    Ok(h.embed(vec![input], opts)?.pop().context("one result")?.vector)
}

#[test]
fn reference_items_match_sentence_transformers() -> Result<()> {
    check_reference(&EmbedConfig::default())
}

/// The f32 path (what CPUs without AVX-512 BF16 run) meets the same bars.
#[test]
fn reference_items_match_with_f32_matmuls() -> Result<()> {
    check_reference(&EmbedConfig { precision: Some(DensePrecision::F32), ..EmbedConfig::default() })
}

fn check_reference(cfg: &EmbedConfig) -> Result<()> {
    let h = start(cfg)?;
    let items = items()?;
    let opts = EmbedOptions::default();
    let mut worst = (1.0f64, String::new());
    for item in &items {
        let ids = h.tokenize(&text(&item.text), true)?;
        ensure!(ids == item.ids, "{:?}: ids {ids:?}, want {:?}", item.text, item.ids);
        let got = h.embed(vec![text(&item.text)], &opts)?.pop().context("one result")?;
        ensure!(
            got.tokens == item.ids.len() && got.vector.len() == 384,
            "{:?}: {} tokens, dim {}",
            item.text,
            got.tokens,
            got.vector.len()
        );
        let (c, n) = (cosine(&got.vector, &item.embedding), norm(&got.vector));
        ensure!(c >= 0.9999, "{:?}: cosine {c:.6} to sentence-transformers", item.text);
        ensure!((n - 1.0).abs() <= 1e-4, "{:?}: norm {n}", item.text);
        if c < worst.0 {
            worst = (c, item.text.chars().take(40).collect());
        }
        // The same ids given as input (specials included: nothing is added) embed the same.
        let given = h.embed(vec![EmbedInput::Tokens(item.ids.clone())], &opts)?.pop().context("one result")?;
        ensure!(given.tokens == item.ids.len(), "{:?}: {} tokens from {} ids", item.text, given.tokens, item.ids.len());
        ensure!(given.vector == got.vector, "{:?}: token-id input differs", item.text);
    }
    eprintln!(
        "minilm: {} items, worst cosine {:.7} ({:?}), precision {:?}",
        items.len(),
        worst.0,
        worst.1,
        h.info().precision
    );
    ensure!(items.iter().any(|i| i.ids.len() == 256), "no item exercises truncation at max_seq_length");
    Ok(())
}

/// A batch of mixed lengths, requests packed together or split across batches, all give the
/// vectors of one input at a time.
#[test]
fn batching_does_not_change_results() -> Result<()> {
    let items = items()?;
    let texts: Vec<EmbedInput> = items.iter().map(|i| text(&i.text)).collect();
    for precision in [None, Some(DensePrecision::F32)] {
        check_batching(&texts, &items, precision)?;
    }
    Ok(())
}

fn check_batching(texts: &[EmbedInput], items: &[Item], precision: Option<DensePrecision>) -> Result<()> {
    let opts = EmbedOptions::default();
    let h = start(&EmbedConfig { precision, ..EmbedConfig::default() })?;
    let alone: Vec<Vec<f32>> = texts.iter().map(|t| one(&h, t.clone(), &opts)).collect::<Result<_>>()?;
    let check = |got: Vec<Vec<f32>>, what: &str| -> Result<()> {
        for ((g, a), item) in got.iter().zip(&alone).zip(items) {
            let d = max_abs_diff(g, a);
            ensure!(d < 1e-5, "{what}: {:?} differs by {d}", item.text);
        }
        Ok(())
    };
    check(h.embed(texts.to_vec(), &opts)?.into_iter().map(|e| e.vector).collect(), "one batch")?;
    // A small token budget splits the request over several batches.
    let small = start(&EmbedConfig { max_batch_tokens: 40, max_batch_seqs: 3, precision, ..EmbedConfig::default() })?;
    check(small.embed(texts.to_vec(), &opts)?.into_iter().map(|e| e.vector).collect(), "split request")?;
    // Concurrent requests are packed into shared batches.
    let pending: Vec<_> = (0..4).map(|_| h.submit(texts.to_vec(), &opts)).collect::<Result<_, _>>()?;
    for p in pending {
        check(p.wait()?.into_iter().map(|e| e.vector).collect(), "concurrent requests")?;
    }
    Ok(())
}

/// sentence-transformers strips text, so whitespace-only input embeds as the empty string:
/// `[CLS] [SEP]`.
#[test]
fn empty_and_whitespace_inputs_embed_like_sentence_transformers() -> Result<()> {
    let h = start(&EmbedConfig::default())?;
    let empty = items()?.into_iter().find(|i| i.text.is_empty()).context("reference has an empty item")?;
    let opts = EmbedOptions::default();
    for input in [text(""), text("   "), text(" \t\n "), EmbedInput::Tokens(vec![101, 102])] {
        let got = h.embed(vec![input.clone()], &opts)?.pop().context("one result")?;
        ensure!(got.tokens == 2, "{input:?}: {} tokens", got.tokens);
        let c = cosine(&got.vector, &empty.embedding);
        ensure!(c >= 0.9999, "{input:?}: cosine {c}");
    }
    Ok(())
}

/// MiniLM as if its config.json declared Matryoshka training (the other files linked).
fn matryoshka_minilm() -> Result<String> {
    let src = std::path::PathBuf::from(minilm()?);
    let dir = std::env::temp_dir().join(format!("kiln-matryoshka-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&src)? {
        let entry = entry?;
        let to = dir.join(entry.file_name());
        if entry.file_name() == "config.json" {
            let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(entry.path())?)?;
            cfg["is_matryoshka"] = serde_json::Value::Bool(true);
            std::fs::write(&to, cfg.to_string())?;
        } else if !to.exists() {
            std::os::unix::fs::symlink(entry.path(), &to)?;
        }
    }
    Ok(dir.to_string_lossy().into_owned())
}

#[test]
fn dimensions_only_for_matryoshka_models() -> Result<()> {
    let plain = start(&EmbedConfig::default())?;
    let dims = |d| EmbedOptions { dimensions: Some(d), ..EmbedOptions::default() };
    match plain.embed(vec![text("a")], &dims(128)) {
        Err(EngineError::InvalidParam { param: "dimensions", message }) => {
            ensure!(message.contains("Matryoshka"), "{message}")
        }
        other => anyhow::bail!("expected a dimensions error, got {other:?}"),
    }
    ensure!(one(&plain, text("x"), &dims(384))?.len() == 384);
    let dir = matryoshka_minilm()?;
    let h = load_embedder(&dir, &EmbedConfig::default())?.handle;
    std::fs::remove_dir_all(&dir)?;
    let full = one(&h, text("A man is eating food."), &EmbedOptions::default())?;
    let short =
        one(&h, text("A man is eating food."), &EmbedOptions { dimensions: Some(128), ..EmbedOptions::default() })?;
    ensure!(short.len() == 128 && (norm(&short) - 1.0).abs() < 1e-5, "len {} norm {}", short.len(), norm(&short));
    let head_norm = norm(&full[..128]) as f32;
    let want: Vec<f32> = full[..128].iter().map(|x| x / head_norm).collect();
    ensure!(max_abs_diff(&short, &want) < 1e-6, "not the renormalized prefix");
    let all = one(&h, text("x"), &EmbedOptions { dimensions: Some(384), ..EmbedOptions::default() })?;
    ensure!(all.len() == 384);
    Ok(())
}

#[test]
fn bad_options_and_inputs_are_errors() -> Result<()> {
    let h = start(&EmbedConfig { max_inputs: 4, ..EmbedConfig::default() })?;
    let dims = |d| EmbedOptions { dimensions: Some(d), ..EmbedOptions::default() };
    let param = |r: Result<Vec<kiln_inference::embed::Embedding>, EngineError>| match r {
        Err(EngineError::InvalidParam { param, .. }) => Ok(param),
        other => anyhow::bail!("expected InvalidParam, got {other:?}"),
    };
    ensure!(param(h.embed(vec![text("a")], &dims(0)))? == "dimensions");
    ensure!(param(h.embed(vec![text("a")], &dims(385)))? == "dimensions");
    ensure!(param(h.embed(vec![], &EmbedOptions::default()))? == "input");
    ensure!(param(h.embed(vec![text("a"); 5], &EmbedOptions::default()))? == "input");
    ensure!(param(h.embed(vec![EmbedInput::Tokens(vec![5, 30522])], &EmbedOptions::default()))? == "input");
    ensure!(param(h.embed(vec![EmbedInput::Tokens(vec![])], &EmbedOptions::default()))? == "input");
    // Issue 14: ids are used as given, [CLS]/[SEP] not added again.
    ensure!(h.embed(vec![EmbedInput::Tokens(vec![101, 7592, 102])], &EmbedOptions::default())?[0].tokens == 3);
    // Too long without truncation: an error naming the limit; with truncation: cut to 256.
    let long = text(&"word ".repeat(300));
    let no_trunc = EmbedOptions { truncate: false, ..EmbedOptions::default() };
    match h.embed(vec![long.clone()], &no_trunc) {
        Err(EngineError::ContextLengthExceeded { max: 256, .. }) => {}
        other => anyhow::bail!("expected ContextLengthExceeded, got {other:?}"),
    }
    ensure!(h.embed(vec![long], &EmbedOptions::default())?[0].tokens == 256);
    ensure!(h.embed(vec![text("short")], &no_trunc)?[0].tokens == 3);
    Ok(())
}

/// With the queue full, a request fails at once with `Overloaded`; a dropped request is skipped
/// and the queue keeps serving.
#[test]
fn full_queue_is_overloaded_at_once() -> Result<()> {
    let h = start(&EmbedConfig { max_queued_requests: 1, ..EmbedConfig::default() })?;
    let long: Vec<EmbedInput> = (0..64).map(|i| text(&format!("{i} {}", "some words to embed ".repeat(40)))).collect();
    let first = h.submit(long.clone(), &EmbedOptions::default())?;
    let t = std::time::Instant::now();
    match h.submit(vec![text("b")], &EmbedOptions::default()) {
        Err(EngineError::Overloaded) => {}
        Err(e) => anyhow::bail!("expected Overloaded, got {e}"),
        Ok(_) => anyhow::bail!("expected Overloaded, the request was accepted"),
    }
    ensure!(t.elapsed().as_millis() < 100, "Overloaded took {:?}", t.elapsed());
    ensure!(h.queued_requests() == 1);
    ensure!(first.wait()?.len() == 64);
    let st = h.stats();
    ensure!(
        st.sequences.load(std::sync::atomic::Ordering::Relaxed) == 64
            && st.batches.load(std::sync::atomic::Ordering::Relaxed) >= 2
    );
    // A request whose caller is gone frees its place and is skipped (a batch of it may already be
    // running: wait up to 10 s for that one).
    drop(h.submit(long, &EmbedOptions::default())?);
    for _ in 0..1000 {
        match h.submit(vec![text("c")], &EmbedOptions::default()) {
            Ok(p) => {
                ensure!(p.wait()?.len() == 1);
                return Ok(());
            }
            Err(EngineError::Overloaded) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("the dropped request never left the queue")
}
