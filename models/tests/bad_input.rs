//! Bad input to the loader and the forward pass comes back as a typed `ModelError` whose message
//! names the offending thing (path, architecture, tensor, key, row, value); nothing panics.
//!
//! Files are small GGUFs written here with candle's own GGUF writer: a tiny but complete llama
//! (one layer, random weights) that loads and runs, and variants of it each broken in one way.
//! The first test proves the tiny model is valid, so every other failure is the intended one.

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kiln_kernels::TokenCtx;
use kiln_models::{CausalLM, ForwardBatch, KvDType, ModelError, ModelFormat, PagedKvCache};
use std::path::{Path, PathBuf};

mod common;
use common::TempDir;

/// Tiny llama: vocab 64, hidden 32, 4 heads of 8 (2 KV heads), FFN 48, one layer, 64 positions.
const VOCAB: usize = 64;
const HIDDEN: usize = 32;
const KV: usize = 16;
const FFN: usize = 48;
const CTX: u32 = 64;
const BS: usize = 4;

fn tiny_tensors() -> Result<Vec<(String, QTensor)>> {
    let shapes: &[(&str, &[usize])] = &[
        ("token_embd.weight", &[VOCAB, HIDDEN]),
        ("output_norm.weight", &[HIDDEN]),
        ("blk.0.attn_norm.weight", &[HIDDEN]),
        ("blk.0.ffn_norm.weight", &[HIDDEN]),
        ("blk.0.attn_q.weight", &[HIDDEN, HIDDEN]),
        ("blk.0.attn_k.weight", &[KV, HIDDEN]),
        ("blk.0.attn_v.weight", &[KV, HIDDEN]),
        ("blk.0.attn_output.weight", &[HIDDEN, HIDDEN]),
        ("blk.0.ffn_gate.weight", &[FFN, HIDDEN]),
        ("blk.0.ffn_up.weight", &[FFN, HIDDEN]),
        ("blk.0.ffn_down.weight", &[HIDDEN, FFN]),
    ];
    shapes
        .iter()
        .map(|(name, shape)| {
            // Random, not zeros: a zero model would hide a wrong row or slot.
            let t = Tensor::randn(0f32, 0.5, *shape, &Device::Cpu)?;
            Ok((name.to_string(), QTensor::quantize(&t, GgmlDType::F32)?))
        })
        .collect()
}

fn tiny_metadata(arch: &str) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value::{String as Str, F32, U32};
    let k = |key: &str| format!("{arch}.{key}");
    vec![
        ("general.architecture".into(), Str(arch.into())),
        (k("embedding_length"), U32(HIDDEN as u32)),
        (k("attention.head_count"), U32(4)),
        (k("attention.head_count_kv"), U32(2)),
        (k("feed_forward_length"), U32(FFN as u32)),
        (k("block_count"), U32(1)),
        (k("attention.layer_norm_rms_epsilon"), F32(1e-5)),
        (k("rope.freq_base"), F32(10_000.0)),
        (k("context_length"), U32(CTX)),
    ]
}

/// The bytes of a GGUF holding `metadata` and `tensors`.
fn gguf_bytes(metadata: &[(String, gguf_file::Value)], tensors: &[(String, QTensor)]) -> Result<Vec<u8>> {
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts)?;
    Ok(out.into_inner())
}

fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let p = dir.0.join(name);
    std::fs::write(&p, bytes)?;
    Ok(p)
}

fn load_gguf(path: &Path) -> kiln_models::Result<Box<dyn CausalLM>> {
    kiln_models::load(&ModelFormat::Gguf(path.to_path_buf()), &Device::Cpu)
}

/// The error of `r`, with its message checked to contain every one of `names`.
fn error_naming<T>(r: kiln_models::Result<T>, names: &[&str]) -> ModelError {
    let Err(e) = r else { panic!("expected an error naming {names:?}, got Ok") };
    let msg = e.to_string();
    eprintln!("error: {msg}");
    for n in names {
        assert!(msg.contains(n), "error message does not name {n:?}: {msg}");
    }
    e
}

fn tiny_model(dir: &TempDir) -> Result<Box<dyn CausalLM>> {
    let p = write(dir, "tiny.gguf", &gguf_bytes(&tiny_metadata("llama"), &tiny_tensors()?)?)?;
    Ok(load_gguf(&p)?)
}

#[test]
fn the_tiny_llama_is_valid() -> Result<()> {
    let dir = TempDir::new("bad-input-valid")?;
    let model = tiny_model(&dir)?;
    let mut cache = PagedKvCache::new(model.config(), 8, BS, KvDType::F32);
    let mut batch = ForwardBatch::default();
    batch.push_seq(&[1, 2, 3, 4, 5, 6], 0, &[3, 1], BS, true)?;
    let logits = model.forward(&batch, &mut cache)?;
    assert_eq!(logits.dims(), &[1, VOCAB]);
    Ok(())
}

#[test]
fn missing_paths_are_not_found() {
    let p = PathBuf::from("/nonexistent/kiln/model.gguf");
    let e = error_naming(ModelFormat::detect(&p), &["/nonexistent/kiln/model.gguf"]);
    assert!(matches!(e, ModelError::NotFound(_)), "{e:?}");
    let e = error_naming(load_gguf(&p), &["/nonexistent/kiln/model.gguf"]);
    assert!(matches!(e, ModelError::NotFound(_)), "{e:?}");
    let d = PathBuf::from("/nonexistent/kiln/hf-dir");
    let e = error_naming(kiln_models::load(&ModelFormat::Safetensors(d), &Device::Cpu), &["/nonexistent/kiln/hf-dir"]);
    assert!(matches!(e, ModelError::NotFound(_)), "{e:?}");
}

#[test]
fn files_that_are_not_gguf_are_rejected_by_name() -> Result<()> {
    let dir = TempDir::new("bad-input-notgguf")?;
    for (name, bytes) in [("text.gguf", &b"this is not a model, just some text"[..]), ("empty.gguf", &b""[..])] {
        let p = write(&dir, name, bytes)?;
        let e = error_naming(load_gguf(&p), &[name, "not a readable GGUF"]);
        assert!(matches!(e, ModelError::Invalid(_)), "{e:?}");
    }
    // A plain file with another extension is not taken for a model at all.
    let p = write(&dir, "weights.bin", b"GGUF")?;
    error_naming(ModelFormat::detect(&p), &["weights.bin"]);
    Ok(())
}

#[test]
fn truncated_gguf_names_the_tensor_it_could_not_read() -> Result<()> {
    let dir = TempDir::new("bad-input-truncated")?;
    let bytes = gguf_bytes(&tiny_metadata("llama"), &tiny_tensors()?)?;
    // Keep the header and the first few tensors; later tensors run past the end of the file.
    let p = write(&dir, "cut.gguf", &bytes[..bytes.len() / 2])?;
    let e = error_naming(load_gguf(&p), &["cut.gguf", "blk.0."]);
    assert!(matches!(e, ModelError::Invalid(_)), "a truncated file is not an unsupported type: {e:?}");
    Ok(())
}

#[test]
fn unsupported_architecture_is_named() -> Result<()> {
    let dir = TempDir::new("bad-input-arch")?;
    let p = write(&dir, "mamba.gguf", &gguf_bytes(&tiny_metadata("mamba"), &tiny_tensors()?)?)?;
    let e = error_naming(load_gguf(&p), &["mamba"]);
    assert!(matches!(e, ModelError::UnsupportedArchitecture(ref a) if a == "mamba"), "{e:?}");
    Ok(())
}

/// Every ggml type candle can hold is also one kiln runs (through candle's `QMatMul` when not
/// its own kernels), so the reachable unsupported case is a type candle cannot even parse: the
/// i-quants. IQ4_NL has Q4_0's block geometry (32 weights in 18 bytes: an f16 scale and 16
/// bytes of nibbles), so a Q4_0 tensor whose type id is changed to IQ4_NL (20) is a well-formed
/// IQ4_NL tensor in every byte.
#[test]
fn iq_quant_tensor_is_named_with_its_type() -> Result<()> {
    let dir = TempDir::new("bad-input-iq")?;
    let mut tensors = tiny_tensors()?;
    let q = tensors.iter_mut().find(|(n, _)| n == "blk.0.attn_q.weight").map(|(_, t)| t).expect("attn_q");
    *q = QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q4_0)?;
    let mut bytes = gguf_bytes(&tiny_metadata("llama"), &tensors)?;
    // Tensor info: name, n_dims (u32), dims (2 x u64), then the type id (u32).
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("name in header") + name.len() + 4 + 16;
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into()?), 2, "Q4_0's type id");
    bytes[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
    let p = write(&dir, "iq4nl.gguf", &bytes)?;
    let e = error_naming(load_gguf(&p), &["blk.0.attn_q.weight", "IQ4_NL", "iq4nl.gguf"]);
    assert!(matches!(e, ModelError::UnsupportedDType { .. }), "{e:?}");
    Ok(())
}

#[test]
fn missing_or_misshapen_tensors_and_bad_metadata_are_named() -> Result<()> {
    let dir = TempDir::new("bad-input-tensors")?;
    let md = tiny_metadata("llama");
    let mut tensors = tiny_tensors()?;
    tensors.retain(|(n, _)| n != "blk.0.ffn_up.weight");
    let p = write(&dir, "missing.gguf", &gguf_bytes(&md, &tensors)?)?;
    let e = error_naming(load_gguf(&p), &["blk.0.ffn_up.weight"]);
    assert!(matches!(e, ModelError::MissingTensor(_)), "{e:?}");

    // K with the rows of one KV head only: loads as a matrix, but does not fit the config.
    let mut tensors = tiny_tensors()?;
    let k = tensors.iter_mut().find(|(n, _)| n == "blk.0.attn_k.weight").map(|(_, t)| t).expect("attn_k");
    *k = QTensor::quantize(&Tensor::randn(0f32, 0.5, (KV / 2, HIDDEN), &Device::Cpu)?, GgmlDType::F32)?;
    let p = write(&dir, "shape.gguf", &gguf_bytes(&md, &tensors)?)?;
    error_naming(load_gguf(&p), &["blk.0.attn_k.weight", "[8, 32]", "[16, 32]"]);

    // A count stored as a string, and a head count of zero.
    for (key, value) in [
        ("llama.block_count", gguf_file::Value::String("one".into())),
        ("llama.attention.head_count", gguf_file::Value::U32(0)),
    ] {
        let mut md = tiny_metadata("llama");
        md.iter_mut().find(|(k, _)| k == key).expect("key").1 = value;
        let p = write(&dir, "meta.gguf", &gguf_bytes(&md, &tiny_tensors()?)?)?;
        error_naming(load_gguf(&p), &[key.trim_start_matches("llama.")]);
    }
    Ok(())
}

/// A Hugging Face config.json of the llama family, with `extra` fields merged in.
fn hf_config(extra: serde_json::Value) -> String {
    let mut c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": CTX, "vocab_size": VOCAB, "tie_word_embeddings": true
    });
    c.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
    c.to_string()
}

#[test]
fn bad_config_json_is_named() -> Result<()> {
    let dir = TempDir::new("bad-input-config")?;
    let load_dir = || kiln_models::load(&ModelFormat::Safetensors(dir.0.clone()), &Device::Cpu);
    let cases: &[(serde_json::Value, &[&str])] = &[
        (serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), &["rope_scaling", "llama3"]),
        (serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 4.0}}), &["rope_scaling", "yarn"]),
        (serde_json::json!({"architectures": ["MambaForCausalLM"]}), &["MambaForCausalLM"]),
        (serde_json::json!({"num_attention_heads": 0}), &["num_attention_heads"]),
        (serde_json::json!({"num_key_value_heads": 3}), &["num_key_value_heads"]),
        (serde_json::json!({"hidden_size": "wide"}), &["config.json", "hidden_size"]),
        (
            serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4}}),
            &["quantization_config", "gptq"],
        ),
    ];
    for (extra, names) in cases {
        std::fs::write(dir.0.join("config.json"), hf_config(extra.clone()))?;
        error_naming(load_dir(), names);
    }
    // A valid config but no weights next to it.
    std::fs::write(dir.0.join("config.json"), hf_config(serde_json::json!({})))?;
    let e = error_naming(load_dir(), &["safetensors", &dir.0.display().to_string()]);
    assert!(matches!(e, ModelError::NotFound(_)), "{e:?}");
    Ok(())
}

#[test]
fn out_of_range_batches_are_invalid_batch_errors() -> Result<()> {
    let dir = TempDir::new("bad-input-batch")?;
    let model = tiny_model(&dir)?;
    let mut cache = PagedKvCache::new(model.config(), 8, BS, KvDType::F32);
    let mut forward = |batch: &ForwardBatch, names: &[&str]| {
        let e = error_naming(model.forward(batch, &mut cache), names);
        assert!(matches!(e, ModelError::InvalidBatch(_)), "{e:?}");
    };
    let seq = |tokens: &[u32], start: usize, table: &[u32]| -> kiln_models::Result<ForwardBatch> {
        let mut b = ForwardBatch::default();
        b.push_seq(tokens, start, table, BS, true)?;
        Ok(b)
    };
    forward(&ForwardBatch::default(), &["empty"]);
    forward(&seq(&[1, VOCAB as u32 + 5], 0, &[0])?, &["token", &(VOCAB + 5).to_string()]);
    // Position 64 is one past the tiny model's context; the table reaches it through block 0.
    forward(&seq(&[1], CTX as usize, &[0; 17])?, &["position", "64"]);
    forward(&seq(&[1, 2], 0, &[8])?, &["block", "8"]);

    let mut b = seq(&[1, 2, 3], 0, &[2])?;
    b.slots[1] = 8 * BS as u32;
    forward(&b, &["slot", "32"]);
    let mut b = seq(&[1, 2, 3], 0, &[2])?;
    b.rows[2] = TokenCtx { table: 1, ctx_len: 3 };
    forward(&b, &["row 2", "block table 1"]);
    let mut b = seq(&[1, 2, 3], 0, &[2])?;
    b.rows[0].ctx_len = 9;
    forward(&b, &["row 0", "9"]);
    let mut b = seq(&[1, 2, 3], 0, &[2])?;
    b.logits_rows.push(7);
    forward(&b, &["logits row", "7"]);
    let mut b = seq(&[1, 2, 3], 0, &[2])?;
    b.positions.pop();
    forward(&b, &["positions"]);

    // A cache laid out for another model (here: two layers instead of one).
    let mut other = model.config().clone();
    other.num_layers = 2;
    let mut wrong = PagedKvCache::new(&other, 8, BS, KvDType::F32);
    let e = error_naming(model.forward(&seq(&[1], 0, &[0])?, &mut wrong), &["cache", "layers"]);
    assert!(matches!(e, ModelError::InvalidBatch(_)), "{e:?}");

    // push_seq itself: a block id whose slot overflows u32, and a start past usize.
    let e = error_naming(seq(&[1], 0, &[u32::MAX]), &["block", &u32::MAX.to_string()]);
    assert!(matches!(e, ModelError::InvalidBatch(_)), "{e:?}");
    let e = error_naming(seq(&[1, 2], usize::MAX, &[0]), &["position"]);
    assert!(matches!(e, ModelError::InvalidBatch(_)), "{e:?}");
    Ok(())
}
