//! Oracle test of the paged path: our llama on the real SmolLM2 GGUF must give the same logits
//! (max abs diff < 1e-3) as candle-transformers' own `quantized_llama`, which keeps a plain
//! concatenated KV cache per sequence: prefill, step-by-step decode, chunked prefill, and a
//! sequence computed next to another one in the same batch.

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use kiln_models::{CausalLM, ForwardBatch, KvDType, ModelFormat, PagedKvCache};
use std::path::PathBuf;

const BS: usize = 16;

fn smollm2() -> Result<PathBuf> {
    let dir = std::env::var_os("KILN_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models")
    });
    let p = dir.join("smollm2-135m-instruct-q4_1.gguf");
    anyhow::ensure!(p.is_file(), "{} missing: run scripts/fetch-models.sh", p.display());
    Ok(p)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn argmax(t: &Tensor) -> Result<u32> {
    Ok(t.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
}

/// Our model plus a sequence's block table, computing `tokens` at `start` in chunks.
struct Ours {
    model: Box<dyn CausalLM>,
    cache: PagedKvCache,
}

impl Ours {
    fn new(path: &PathBuf) -> Result<Self> {
        let model = kiln_models::load(&ModelFormat::Gguf(path.clone()), &Device::Cpu)?;
        let cache = PagedKvCache::new(model.config(), 64, BS, KvDType::F16);
        Ok(Self { model, cache })
    }

    fn run(&mut self, seqs: &[(&[u32], usize, &[u32])]) -> Result<Tensor> {
        let mut batch = ForwardBatch::default();
        for (tokens, start, table) in seqs {
            batch.push_seq(tokens, *start, table, BS, true)?;
        }
        Ok(self.model.forward(&batch, &mut self.cache)?)
    }
}

const PROMPT: &[u32] = &[504, 3575, 282, 4649, 314]; // "The capital of France is"

#[test]
fn prefill_and_decode_match_candle_quantized_llama() -> Result<()> {
    let path = smollm2()?;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut oracle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut ours = Ours::new(&path)?;
    let table: Vec<u32> = vec![7, 3, 11]; // deliberately scattered blocks

    let want = oracle.forward(&Tensor::new(PROMPT, &Device::Cpu)?.unsqueeze(0)?, 0)?;
    let got = ours.run(&[(PROMPT, 0, &table)])?;
    let d = max_diff(&want.flatten_all()?, &got.flatten_all()?)?;
    assert!(d < 1e-3, "prefill logits differ by {d}");

    let mut pos = PROMPT.len();
    let mut next = argmax(&want)?;
    for step in 0..24 {
        let want = oracle.forward(&Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?, pos)?;
        let got = ours.run(&[(&[next], pos, &table)])?;
        let d = max_diff(&want.flatten_all()?, &got.flatten_all()?)?;
        assert!(d < 1e-3, "decode step {step} logits differ by {d}");
        next = argmax(&want)?;
        pos += 1;
    }
    Ok(())
}

#[test]
fn chunked_prefill_and_batching_do_not_change_logits() -> Result<()> {
    let path = smollm2()?;
    let mut ours = Ours::new(&path)?;
    let whole = ours.run(&[(PROMPT, 0, &[1])])?;
    // Same prompt in chunks of 2 into other blocks.
    let t2: Vec<u32> = vec![5];
    ours.run(&[(&PROMPT[..2], 0, &t2)])?;
    ours.run(&[(&PROMPT[2..4], 2, &t2)])?;
    let chunked = ours.run(&[(&PROMPT[4..], 4, &t2)])?;
    assert_eq!(max_diff(&whole, &chunked)?, 0.0, "chunked prefill changed logits");
    // Batched beside another sequence that is mid-prefill.
    let other: &[u32] = &[19556, 28, 905, 17, 1311, 582];
    let both = ours.run(&[(other, 0, &[9]), (PROMPT, 0, &[2])])?;
    let d = max_diff(&whole.flatten_all()?, &both.get(1)?)?;
    assert_eq!(d, 0.0, "batching changed logits by {d}");
    Ok(())
}

#[test]
#[ignore]
fn debug_vs_reference() -> Result<()> {
    let path = smollm2()?;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    for (k, v) in content.tensor_infos.iter().filter(|(k, _)| k.starts_with("blk.0.") || !k.starts_with("blk")) {
        eprintln!("{k} {:?} {:?}", v.ggml_dtype, v.shape);
    }
    let mut oracle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut ours = Ours::new(&path)?;
    let want = oracle.forward(&Tensor::new(PROMPT, &Device::Cpu)?.unsqueeze(0)?, 0)?.flatten_all()?;
    let got = ours.run(&[(PROMPT, 0, &[1])])?.flatten_all()?;
    for t in [want, got] {
        let lp = candle_nn::ops::log_softmax(&t, 0)?;
        let v = lp.to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|a, b| v[*b].partial_cmp(&v[*a]).unwrap());
        eprintln!("{:?}", idx[..5].iter().map(|&i| (i, v[i])).collect::<Vec<_>>());
    }
    Ok(())
}

#[test]
#[ignore]
fn debug_prefix_lengths() -> Result<()> {
    let path = smollm2()?;
    for n in 1..=PROMPT.len() {
        let mut file = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let mut oracle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
        let mut ours = Ours::new(&path)?;
        let want = oracle.forward(&Tensor::new(&PROMPT[..n], &Device::Cpu)?.unsqueeze(0)?, 0)?.flatten_all()?;
        let got = ours.run(&[(&PROMPT[..n], 0, &[1])])?.flatten_all()?;
        eprintln!("n={n} diff {}", max_diff(&want, &got)?);
    }
    Ok(())
}

#[test]
#[ignore]
fn debug_stepwise() -> Result<()> {
    let path = smollm2()?;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut oracle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut oracle2 = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut ours = Ours::new(&path)?;
    let pre = oracle2.forward(&Tensor::new(&PROMPT[..2], &Device::Cpu)?.unsqueeze(0)?, 0)?.flatten_all()?;
    for (i, &t) in PROMPT[..2].iter().enumerate() {
        let want = oracle.forward(&Tensor::new(&[t], &Device::Cpu)?.unsqueeze(0)?, i)?.flatten_all()?;
        let got = ours.run(&[(&[t], i, &[1])])?.flatten_all()?;
        eprintln!("step {i} ours-vs-candle-step {} candle-step-vs-prefill {}", max_diff(&want, &got)?, max_diff(&want, &pre)?);
    }
    Ok(())
}

#[test]
#[ignore]
fn debug_rope() -> Result<()> {
    use kiln_kernels::{rope_inplace, HeadsSpan, RopeStyle, RopeTable};
    let table = RopeTable::new(64, 16, 100000.0);
    let x: Vec<f32> = (0..3 * 64 * 4).map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0).collect();
    // candle: [1, heads=3, seq=4, 64]
    let xt = Tensor::from_vec(x.clone(), (1, 4, 3, 64), &Device::Cpu)?.transpose(1, 2)?.contiguous()?;
    let theta: Vec<f32> = (0..64).step_by(2).map(|i| 1f32 / 100000f32.powf(i as f32 / 64.0)).collect();
    let theta = Tensor::new(theta.as_slice(), &Device::Cpu)?;
    let idx = Tensor::arange(0u32, 4, &Device::Cpu)?.to_dtype(candle_core::DType::F32)?.reshape((4, 1))?.matmul(&theta.reshape((1, 32))?)?;
    let want = candle_nn::rotary_emb::rope_i(&xt, &idx.cos()?, &idx.sin()?)?.transpose(1, 2)?.flatten_all()?;
    let mut got = x.clone();
    rope_inplace(&mut got, 3 * 64, HeadsSpan { offset: 0, heads: 3, head_dim: 64 }, &[0, 1, 2, 3], &table, RopeStyle::Interleaved);
    eprintln!("rope diff {}", max_diff(&want, &Tensor::new(got.as_slice(), &Device::Cpu)?)?);
    Ok(())
}

#[test]
#[ignore]
fn debug_cfg() -> Result<()> {
    let ours = Ours::new(&smollm2()?)?;
    eprintln!("{:?}", ours.model.config());
    let mut file = std::fs::File::open(&smollm2()?)?;
    let content = gguf_file::Content::read(&mut file)?;
    for (k, v) in content.metadata.iter().filter(|(k, _)| k.starts_with("llama")) { eprintln!("{k} {v:?}"); }
    Ok(())
}

#[test]
#[ignore]
fn debug_sensitivity() -> Result<()> {
    let path = smollm2()?;
    let mut ours = Ours::new(&path)?;
    let a = ours.run(&[(&PROMPT[..2], 0, &[1])])?.flatten_all()?;
    std::env::set_var("REFATT", "1");
    let b = ours.run(&[(&PROMPT[..2], 0, &[1])])?.flatten_all()?;
    std::env::remove_var("REFATT");
    eprintln!("fast vs f64 reference attention: logits diff {}", max_diff(&a, &b)?);
    Ok(())
}

#[test]
#[ignore]
fn debug_vs_llamacpp_greedy() -> Result<()> {
    let path = smollm2()?;
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("/work/shared/reference/smollm2-135m-instruct-q4_1.json")?)?;
    for c in r["completion"].as_array().unwrap().iter().take(4) {
        let prompt: Vec<u32> = c["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<u32> = c["steps"].as_array().unwrap().iter().map(|s| s["id"].as_u64().unwrap() as u32).collect();
        let mut file = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let mut oracle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
        let mut ours = Ours::new(&path)?;
        let table: Vec<u32> = (0..8).collect();
        let (mut a, mut b) = (vec![], vec![]);
        let mut l1 = oracle.forward(&Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?, 0)?;
        let mut l2 = ours.run(&[(&prompt, 0, &table)])?;
        for i in 0..want.len() {
            a.push(argmax(&l1)?); b.push(argmax(&l2)?);
            let pos = prompt.len() + i;
            l1 = oracle.forward(&Tensor::new(&[want[i]], &Device::Cpu)?.unsqueeze(0)?, pos)?;
            l2 = ours.run(&[(&[want[i]], pos, &table)])?;
        }
        let agree = |x: &Vec<u32>| x.iter().zip(&want).take_while(|(p, q)| p == q).count();
        eprintln!("candle agrees {} ours agrees {} of {}", agree(&a), agree(&b), want.len());
    }
    Ok(())
}

#[test]
#[ignore]
fn debug_attention_vs_candle_ops() -> Result<()> {
    use kiln_kernels::{paged_attention, AttnShape, TokenCtx};
    let (h, kvh, d, t) = (9usize, 3usize, 64usize, 2usize);
    let f = |n: usize, s: usize| -> Vec<f32> { (0..n).map(|i| (((i + s) * 7919) % 113) as f32 / 50.0 - 1.0).collect() };
    let q = f(t * h * d, 1);
    let k = f(t * kvh * d, 2);
    let v = f(t * kvh * d, 3);
    // candle: q [1, h, t, d], k/v [1, kvh, t, d]
    let qt = Tensor::from_vec(q.clone(), (1, t, h, d), &Device::Cpu)?.transpose(1, 2)?.contiguous()?;
    let kt = Tensor::from_vec(k.clone(), (1, t, kvh, d), &Device::Cpu)?.transpose(1, 2)?.contiguous()?;
    let vt = Tensor::from_vec(v.clone(), (1, t, kvh, d), &Device::Cpu)?.transpose(1, 2)?.contiguous()?;
    let kt = candle_transformers::utils::repeat_kv(kt, 3)?;
    let vt = candle_transformers::utils::repeat_kv(vt, 3)?;
    let att = (qt.narrow(2, 1, 1)?.matmul(&kt.t()?)? / 8.0)?;
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    let want = att.matmul(&vt.contiguous()?)?.transpose(1, 2)?.flatten_all()?;
    // ours: cache with block 0 holding both positions
    let mut kc = vec![0f32; 16 * kvh * d];
    let mut vc = vec![0f32; 16 * kvh * d];
    kc[..t * kvh * d].copy_from_slice(&k);
    vc[..t * kvh * d].copy_from_slice(&v);
    let shape = AttnShape { num_heads: h, num_kv_heads: kvh, head_dim: d, block_size: 16, scale: 0.125 };
    let mut out = vec![0f32; h * d];
    let table: Vec<u32> = vec![0];
    paged_attention(&q[h * d..], h * d, &[TokenCtx { table: 0, ctx_len: 2 }], &[&table], &shape, (&kc, &vc), &mut out);
    eprintln!("attention diff {}", max_diff(&want, &Tensor::new(out.as_slice(), &Device::Cpu)?)?);
    Ok(())
}

#[test]
#[ignore]
fn debug_single_tokens() -> Result<()> {
    let path = smollm2()?;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut oracle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut ours = Ours::new(&path)?;
    for &t in &[504u32, 3575, 282, 4649, 314, 0, 1, 49151] {
        let want = oracle.forward(&Tensor::new(&[t], &Device::Cpu)?.unsqueeze(0)?, 0)?.flatten_all()?;
        let got = ours.run(&[(&[t], 0, &[1])])?.flatten_all()?;
        eprintln!("token {t} diff {}", max_diff(&want, &got)?);
    }
    Ok(())
}
