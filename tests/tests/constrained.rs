//! Constrained decoding in the engine, on the real SmolLM2 model and tokenizer: JSON-schema
//! output is valid for every seed, forced text costs no sampling, a trigger leaves the text before
//! it untouched, grammars survive `n > 1`, concurrency and preemption, and a schema the grammar
//! engine cannot honour is a typed error, an output the token budget would cut is closed as JSON.
//! Every block is free afterwards.

use anyhow::Result;
use kiln_inference::engine::{EngineConfig, EngineHandle, Prompt};
use kiln_inference::grammar::compact_json_schema;
use kiln_inference::{Constraint, EngineError, SamplingParams, Trigger};
use kiln_tests::{collect, run, smollm2, start, test_config, wait_all_blocks_free, Output};
use serde_json::{json, Value};

const CHAT: &str = "<|im_start|>user\nDescribe a cat as JSON.<|im_end|>\n<|im_start|>assistant\n";

fn pet_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "kind": {"enum": ["cat", "dog", "bird"]},
            "toys": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "age", "kind", "toys"],
        "additionalProperties": false,
    })
}

/// Hand-checks an output against `pet_schema` (no validator crate needed for one schema).
fn check_pet(text: &str) -> Result<()> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not JSON ({e}): {text:?}"))?;
    let o = v.as_object().ok_or_else(|| anyhow::anyhow!("not an object: {text}"))?;
    anyhow::ensure!(o.len() == 4, "keys {:?}", o.keys().collect::<Vec<_>>());
    anyhow::ensure!(o["name"].as_str().is_some_and(|s| s.chars().count() <= 12), "name {text}");
    anyhow::ensure!(o["age"].as_i64().is_some_and(|a| (0..=30).contains(&a)), "age {text}");
    anyhow::ensure!(["cat", "dog", "bird"].contains(&o["kind"].as_str().unwrap_or("")), "kind {text}");
    let toys = o["toys"].as_array().ok_or_else(|| anyhow::anyhow!("toys {text}"))?;
    anyhow::ensure!(
        toys.len() <= 3 && toys.iter().all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 10)),
        "toys {text}"
    );
    Ok(())
}

fn constrained(c: Constraint, seed: Option<u64>, max_tokens: usize) -> SamplingParams {
    let temperature = if seed.is_some() { 1.0 } else { 0.0 };
    SamplingParams { temperature, seed, max_tokens: Some(max_tokens), constraint: Some(c), ..SamplingParams::default() }
}

fn one(h: &EngineHandle, prompt: &str, p: SamplingParams) -> Result<Output> {
    Ok(run(h, Prompt::Text(prompt.to_string()), p)?.remove(0))
}

#[test]
fn json_schema_output_is_valid_for_every_seed_and_invariant() -> Result<()> {
    let model = smollm2()?;
    let e = start(&model, &test_config())?;
    let h = &e.handle;
    let c = Constraint::json_schema(compact_json_schema(pet_schema()));
    let greedy = one(h, CHAT, constrained(c.clone(), None, 120))?;
    check_pet(&greedy.text)?;
    assert_eq!(greedy.finish_reason, Some("stop"), "a complete object ends the turn: {}", greedy.text);

    // 24 seeded samples at temperature 1, all submitted at once (mixed with free requests).
    let streams = (0..24u64)
        .map(|s| h.generate(Prompt::Text(CHAT.into()), constrained(c.clone(), Some(s), 120)))
        .chain((0..4).map(|_| {
            h.generate(Prompt::Text(CHAT.into()), SamplingParams { max_tokens: Some(40), ..SamplingParams::default() })
        }))
        .collect::<Result<Vec<_>, _>>()?;
    let outs: Vec<Output> = streams.into_iter().map(|s| Ok(collect(s)?.remove(0))).collect::<Result<_>>()?;
    for (seed, o) in outs.iter().take(24).enumerate() {
        check_pet(&o.text).map_err(|err| anyhow::anyhow!("seed {seed}: {err}"))?;
    }
    // The same seed alone gives the same tokens as it did among 27 others.
    let again = one(h, CHAT, constrained(c.clone(), Some(5), 120))?;
    assert_eq!(again.tokens, outs[5].tokens);

    // Chunked prefill (budget 16) and a cache so small that sequences are preempted.
    let tight =
        start(&model, &EngineConfig { max_num_batched_tokens: 16, num_blocks_override: Some(24), ..test_config() })?;
    let streams = (0..6u64)
        .map(|s| tight.handle.generate(Prompt::Text(CHAT.into()), constrained(c.clone(), Some(s), 120)))
        .collect::<Result<Vec<_>, _>>()?;
    for (s, st) in streams.into_iter().enumerate() {
        assert_eq!(collect(st)?.remove(0).tokens, outs[s].tokens, "seed {s} under chunking/preemption");
    }
    wait_all_blocks_free(&tight.handle)?;
    wait_all_blocks_free(h)?;
    Ok(())
}

#[test]
fn forced_text_trigger_forks_and_errors() -> Result<()> {
    let model = smollm2()?;
    let e = start(&model, &test_config())?;
    let h = &e.handle;

    // A grammar with one possible output: every token is forced, appended without sampling.
    let fixed = "The answer is 42, of course.";
    let lark = format!("start: {}", serde_json::to_string(fixed)?);
    let o = one(h, "Q: what is six times seven?\nA:", constrained(Constraint::lark(&lark), None, 50))?;
    assert_eq!(o.text, fixed);
    assert_eq!(o.finish_reason, Some("stop"));
    assert_eq!(o.tokens, h.tokenizer().encode(fixed, false)?, "forced tokens are the canonical tokenization");

    // A trigger: the text up to it is what the free model writes; after it, the grammar.
    let prompt = "The capital of France is";
    let free = one(h, prompt, SamplingParams { temperature: 0.0, max_tokens: Some(12), ..SamplingParams::default() })?;
    let cut = free.text.char_indices().nth(6).map_or(free.text.len(), |(i, _)| i);
    let trigger = free.text[..cut].to_string();
    let grammar = format!(r#"start: {} " [" /[0-9]{{3}}/ "]""#, serde_json::to_string(&trigger)?);
    let lazy =
        Constraint { triggers: vec![Trigger { text: trigger.clone(), at_start: false }], ..Constraint::lark(grammar) };
    let o = one(h, prompt, constrained(lazy, None, 30))?;
    let rest = o
        .text
        .strip_prefix(&trigger)
        .unwrap_or_else(|| panic!("{:?} does not start with the trigger {trigger:?}", o.text));
    assert!(
        rest.len() == 6
            && rest.starts_with(" [")
            && rest.ends_with(']')
            && rest[2..5].bytes().all(|b| b.is_ascii_digit()),
        "{:?}",
        o.text
    );

    // n = 3 choices each follow the grammar independently.
    let c = Constraint::json_schema(compact_json_schema(pet_schema()));
    let outs = run(h, Prompt::Text(CHAT.into()), SamplingParams { n: 3, ..constrained(c, Some(11), 120) })?;
    assert_eq!(outs.len(), 3);
    for o in &outs {
        check_pet(&o.text)?;
    }

    // What the grammar engine does not support is a typed error naming it, before any work.
    let bad = Constraint::json_schema(json!({"type": "object", "if": {"required": ["a"]}}));
    match h.generate(Prompt::Text(CHAT.into()), constrained(bad, None, 10)) {
        Err(EngineError::Grammar(m)) => assert!(m.contains("if"), "{m}"),
        other => panic!("expected a grammar error, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        h.generate(Prompt::Text(CHAT.into()), constrained(Constraint::lark("start: ("), None, 10)),
        Err(EngineError::Grammar(_))
    ));
    wait_all_blocks_free(h)?;
    Ok(())
}

#[test]
fn the_budget_closes_the_json() -> Result<()> {
    let model = smollm2()?;
    let e = start(&model, &test_config())?;
    let h = &e.handle;
    let any_object = Constraint::json_schema(compact_json_schema(json!({"type": "object"})));
    let prompt = "<|im_start|>user\nWrite a JSON object describing a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n";
    let mut closed = 0;
    for max_tokens in [10, 16, 24, 40] {
        for seed in 0..6u64 {
            let o = one(h, prompt, constrained(any_object.clone(), Some(seed), max_tokens))?;
            let v: Value = serde_json::from_str(&o.text)
                .map_err(|err| anyhow::anyhow!("max_tokens {max_tokens} seed {seed}: {err}: {:?}", o.text))?;
            assert!(v.is_object() && o.tokens.len() <= max_tokens, "{:?}", o.text);
            closed += usize::from(o.finish_reason == Some("length"));
        }
    }
    // Most of these budgets are too short for the model's own object: the closing did the work,
    // and said so (`length`).
    assert!(closed >= 12, "only {closed}/24 closed at the budget");
    // Required keys still missing when the budget nears its end are written too (the closing is
    // planned on the grammar, not only on the nesting).
    let pets = Constraint::json_schema(compact_json_schema(pet_schema()));
    for max_tokens in [28, 36, 48] {
        for seed in 0..4u64 {
            let o = one(h, CHAT, constrained(pets.clone(), Some(seed), max_tokens))?;
            check_pet(&o.text).map_err(|err| anyhow::anyhow!("max_tokens {max_tokens} seed {seed}: {err}"))?;
            assert!(o.tokens.len() <= max_tokens);
        }
    }
    // Free generation is untouched by any of it.
    let free = one(h, prompt, SamplingParams { temperature: 0.0, max_tokens: Some(10), ..SamplingParams::default() })?;
    assert_eq!((free.tokens.len(), free.finish_reason), (10, Some("length")));
    wait_all_blocks_free(h)?;
    Ok(())
}
