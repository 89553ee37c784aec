//! Default sampling parameters: what a request gets for the sampling fields it leaves out.
//!
//! Owns: [`SamplingDefaults`] (each field optional, so layers can be stacked), reading a model's
//! own recommendation (`generation_config.json` beside safetensors weights, as vLLM does, or a
//! GGUF file's `general.sampling.*` metadata, as llama.cpp does), the `key=value,...` syntax of
//! the server's override, and [`LLAMA_CPP_DEFAULTS`], the fallback kiln applies when neither the
//! model nor the operator says anything.
//! Must not: fill a field the request set (the server applies these only to absent fields), or
//! know about HTTP.

use crate::error::EngineError;
use crate::params::SamplingParams;
use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use kiln_models::ModelFormat;
use std::path::Path;

/// Sampling fields a layer of defaults may set; `None` leaves the field to the layer below.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 disables top-k.
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// llama.cpp's (and so llama-server's) sampler defaults for the fields a request leaves out:
/// top-k 40, top-p 0.95, min-p 0.05, so a request samples as it would on llama-server.
/// Temperature stays OpenAI's 1.0.
pub const LLAMA_CPP_DEFAULTS: SamplingDefaults = SamplingDefaults {
    temperature: None,
    top_p: Some(0.95),
    top_k: Some(40),
    min_p: Some(0.05),
    repetition_penalty: None,
};

impl SamplingDefaults {
    /// Every field `self` sets, and the rest from `below`.
    pub fn over(self, below: SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            temperature: self.temperature.or(below.temperature),
            top_p: self.top_p.or(below.top_p),
            top_k: self.top_k.or(below.top_k),
            min_p: self.min_p.or(below.min_p),
            repetition_penalty: self.repetition_penalty.or(below.repetition_penalty),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == SamplingDefaults::default()
    }

    /// `top_k=40,top_p=0.95,min_p=0.05` (also `temperature`, `repetition_penalty`); an empty
    /// string sets nothing. Values are range-checked as requests are.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut d = SamplingDefaults::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| format!("'{item}' is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            let f = || v.parse::<f32>().map_err(|_| format!("{k}: '{v}' is not a number"));
            match k {
                "temperature" | "temp" => d.temperature = Some(f()?),
                "top_p" => d.top_p = Some(f()?),
                "top_k" => d.top_k = Some(v.parse().map_err(|_| format!("top_k: '{v}' is not a whole number"))?),
                "min_p" => d.min_p = Some(f()?),
                "repetition_penalty" => d.repetition_penalty = Some(f()?),
                _ => {
                    return Err(format!(
                        "unknown sampling default '{k}'; known: temperature, top_p, top_k, min_p, repetition_penalty"
                    ))
                }
            }
        }
        d.validate()?;
        Ok(d)
    }

    /// The same range checks a request's fields pass.
    pub fn validate(&self) -> Result<(), String> {
        self.apply(SamplingParams::default()).validate(usize::MAX).map_err(|e| e.to_string())
    }

    /// `p` with every field this sets.
    fn apply(&self, mut p: SamplingParams) -> SamplingParams {
        p.temperature = self.temperature.unwrap_or(p.temperature);
        p.top_p = self.top_p.unwrap_or(p.top_p);
        p.top_k = self.top_k.unwrap_or(p.top_k);
        p.min_p = self.min_p.unwrap_or(p.min_p);
        p.repetition_penalty = self.repetition_penalty.unwrap_or(p.repetition_penalty);
        p
    }

    /// The model's own recommendation, if its files carry one. An unreadable or odd value is
    /// ignored (it only ever fills fields a request left out); a value out of range is dropped.
    pub fn from_model(format: &ModelFormat) -> Result<Self, EngineError> {
        let d = match format {
            ModelFormat::Gguf(file) => Self::from_gguf(&read_gguf(file)?),
            ModelFormat::Safetensors(dir) => Self::from_generation_config(dir),
        };
        Ok(if d.validate().is_ok() { d } else { SamplingDefaults::default() })
    }

    /// `general.sampling.{temp,top_p,top_k,min_p,penalty_repeat}` (llama.cpp's keys).
    pub fn from_gguf(c: &Content) -> Self {
        let num = |k: &str| c.metadata.get(&format!("general.sampling.{k}")).and_then(gguf_number);
        SamplingDefaults {
            temperature: num("temp").map(|x| x as f32),
            top_p: num("top_p").map(|x| x as f32),
            top_k: num("top_k").filter(|x| *x >= 0.0).map(|x| x as usize),
            min_p: num("min_p").map(|x| x as f32),
            repetition_penalty: num("penalty_repeat").map(|x| x as f32),
        }
    }

    /// `generation_config.json`'s `temperature`, `top_p`, `top_k`, `min_p`,
    /// `repetition_penalty` (what vLLM reads); none when the file is absent.
    pub fn from_generation_config(dir: &Path) -> Self {
        let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else { return Self::default() };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return Self::default() };
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        SamplingDefaults {
            temperature: num("temperature").map(|x| x as f32),
            top_p: num("top_p").map(|x| x as f32),
            top_k: num("top_k").filter(|x| *x >= 0.0).map(|x| x as usize),
            min_p: num("min_p").map(|x| x as f32),
            repetition_penalty: num("repetition_penalty").map(|x| x as f32),
        }
    }
}

fn gguf_number(v: &GgufValue) -> Option<f64> {
    Some(match v {
        GgufValue::F32(x) => *x as f64,
        GgufValue::F64(x) => *x,
        GgufValue::U32(x) => *x as f64,
        GgufValue::I32(x) => *x as f64,
        GgufValue::U64(x) => *x as f64,
        GgufValue::I64(x) => *x as f64,
        GgufValue::U16(x) => *x as f64,
        GgufValue::I16(x) => *x as f64,
        GgufValue::U8(x) => *x as f64,
        GgufValue::I8(x) => *x as f64,
        _ => return None,
    })
}

fn read_gguf(path: &Path) -> Result<Content, EngineError> {
    let err = |e: &dyn std::fmt::Display| EngineError::Load(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| err(&e))?;
    Content::read(&mut file).map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_layers_and_apply() {
        let d = SamplingDefaults::parse("top_k=20, temperature=0.7").unwrap();
        assert_eq!((d.top_k, d.temperature, d.top_p), (Some(20), Some(0.7), None));
        let all = d.over(LLAMA_CPP_DEFAULTS);
        assert_eq!((all.top_k, all.top_p, all.min_p, all.temperature), (Some(20), Some(0.95), Some(0.05), Some(0.7)));
        let p = all.apply(SamplingParams::default());
        assert_eq!((p.top_k, p.top_p, p.min_p, p.temperature), (20, 0.95, 0.05, 0.7));
        assert!(SamplingDefaults::parse("").unwrap().is_empty());
        assert!(SamplingDefaults::parse("top_k=x").unwrap_err().contains("top_k"));
        assert!(SamplingDefaults::parse("top_p=1.5").unwrap_err().contains("top_p"));
        assert!(SamplingDefaults::parse("typical_p=0.5").unwrap_err().contains("unknown"));
    }

    #[test]
    fn reads_gguf_keys_and_generation_config() {
        let mut c = Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: Default::default(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        c.metadata.insert("general.sampling.top_k".into(), GgufValue::I32(20));
        c.metadata.insert("general.sampling.temp".into(), GgufValue::F32(0.6));
        c.metadata.insert("general.sampling.penalty_repeat".into(), GgufValue::F32(1.05));
        let d = SamplingDefaults::from_gguf(&c);
        assert_eq!((d.top_k, d.temperature, d.repetition_penalty, d.top_p), (Some(20), Some(0.6), Some(1.05), None));
        let dir = std::env::temp_dir().join(format!("kiln-gencfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("generation_config.json"), r#"{"do_sample": true, "top_p": 0.8, "top_k": 20}"#)
            .unwrap();
        let g = SamplingDefaults::from_generation_config(&dir);
        assert_eq!((g.top_p, g.top_k, g.min_p), (Some(0.8), Some(20), None));
        assert!(SamplingDefaults::from_generation_config(&dir.join("absent")).is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }
}
