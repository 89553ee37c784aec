//! `kiln generate`: one request through the real engine, generated text streamed to stdout.

use crate::engine_args::EngineArgs;
use anyhow::{bail, Result};
use clap::Args;
use kiln_inference::engine::Prompt;
use kiln_inference::tokenizer::ChatInput;
use kiln_inference::SamplingParams;
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Raw prompt text (no chat template).
    #[arg(long, conflicts_with = "chat")]
    pub prompt: Option<String>,
    /// One user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// Optional system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let engine = a.engine.start()?;
    let handle = engine.handle;
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), None) => Prompt::Text(p.clone()),
        (None, Some(c)) => {
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(serde_json::json!({"role": "system", "content": s}));
            }
            messages.push(serde_json::json!({"role": "user", "content": c}));
            if handle.tokenizer().chat_template.is_none() {
                bail!("this model has no chat template; use --prompt");
            }
            let kwargs = serde_json::Map::new();
            let chat = ChatInput { messages: &messages, tools: None, add_generation_prompt: true, kwargs: &kwargs };
            Prompt::Tokens(handle.tokenizer().encode_chat(&chat)?)
        }
        _ => bail!("give --prompt TEXT or --chat TEXT"),
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        max_tokens: Some(a.max_tokens),
        stop: a.stop.clone(),
        ..SamplingParams::default()
    };
    let mut stream = handle.generate(prompt, params)?;
    let mut out = std::io::stdout().lock();
    let (mut n, t) = (0usize, std::time::Instant::now());
    while let Some(delta) = stream.blocking_next() {
        let delta = delta?;
        n += delta.tokens.len();
        out.write_all(delta.text.as_bytes())?;
        out.flush()?;
        if let Some(reason) = delta.finish_reason {
            tracing::info!(tokens = n, secs = t.elapsed().as_secs_f32(), finish_reason = reason.as_str(), "done");
        }
    }
    writeln!(out)?;
    handle.shutdown();
    Ok(())
}
