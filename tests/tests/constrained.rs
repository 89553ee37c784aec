//! Constrained decoding in the engine, on the real SmolLM2 model and tokenizer: JSON-schema
//! output is valid for every seed, forced text costs no sampling, a trigger leaves the text before
//! it untouched, grammars survive `n > 1`, concurrency and preemption, and a schema the grammar
//! engine cannot honour is a typed error, the token budget cuts constrained output exactly where it
//! would cut the unbounded one (never closing or inventing anything), and the cache of compiled
//! grammars stays within its byte bound. Every block is free afterwards.

use anyhow::Result;
use kiln_inference::engine::{EngineConfig, EngineHandle, Prompt};
use kiln_inference::grammar::{closed_objects, compact_json_schema, inline_json_schema, GrammarLimits};
use kiln_inference::{Constraint, EngineError, Grammar, SamplingParams, Trigger};
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
    // A forced run cut by the budget is `length`, not a grammar that completed out of sight.
    let cut = one(h, "Q: what is six times seven?\nA:", constrained(Constraint::lark(&lark), None, 3))?;
    assert_eq!((&cut.tokens[..], cut.finish_reason), (&o.tokens[..3], Some("length")));

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

/// A `required` tool-call grammar as the server builds it (`server/src/api/tools/grammar.rs`).
fn tool_calls() -> Constraint {
    let weather = inline_json_schema(closed_objects(json!({"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]})));
    let time = inline_json_schema(closed_objects(json!({"type": "object", "properties": {}})));
    let lit = |s: &str| serde_json::to_string(s).expect("a string");
    let head = |name: &str| lit(&format!("{{\"name\": \"{name}\", \"arguments\": "));
    Constraint::lark(format!(
        "start: {open} call ({next} call)*\ncall: {nl} body {close}\nbody: fn_0 | fn_1\n\
         fn_0: {h0} args_0 {brace}\nargs_0: %json {weather}\nfn_1: {h1} args_1 {brace}\nargs_1: %json {time}\n",
        open = lit("<tool_call>"),
        next = lit("\n<tool_call>"),
        nl = lit("\n"),
        close = lit("\n</tool_call>"),
        h0 = head("get_weather"),
        h1 = head("get_time"),
        brace = lit("}"),
    ))
}

const TOOL_CHAT: &str = "<|im_start|>system\nCall get_weather(city, unit) or get_time() inside <tool_call></tool_call> tags.<|im_end|>\n<|im_start|>user\nWhat's the weather in Oslo, and the time?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn budget_cuts_are_prefixes_of_the_unbounded_output() -> Result<()> {
    let model = smollm2()?;
    let e = start(&model, &test_config())?;
    let h = &e.handle;
    let (pets, tools) = (Constraint::json_schema(compact_json_schema(pet_schema())), tool_calls());
    // 25 seeds of a schema and 25 of `required` tool calls, each unbounded and at six budgets.
    let cases: Vec<(&str, &Constraint, u64)> =
        (0..25).map(|s| (CHAT, &pets, s)).chain((0..25).map(|s| (TOOL_CHAT, &tools, s))).collect();
    let budgets = [10, 20, 30, 40, 50, 60];
    let submit = |max: usize| -> Result<Vec<Output>> {
        let streams = cases
            .iter()
            .map(|&(p, c, s)| h.generate(Prompt::Text(p.into()), constrained(c.clone(), Some(s), max)))
            .collect::<Result<Vec<_>, _>>()?;
        streams.into_iter().map(|st| Ok(collect(st)?.remove(0))).collect()
    };
    let full = submit(1024)?;
    for (o, &(_, c, seed)) in full.iter().zip(&cases) {
        anyhow::ensure!(o.finish_reason == Some("stop"), "seed {seed}: unbounded output did not end: {:?}", o.text);
        if matches!(c.grammar, Grammar::JsonSchema(_)) {
            check_pet(&o.text).map_err(|err| anyhow::anyhow!("seed {seed}: {err}"))?;
        }
    }
    let mut cut = 0;
    for n in budgets {
        for ((o, f), &(_, _, seed)) in submit(n)?.iter().zip(&full).zip(&cases) {
            let at = format!("seed {seed}, max_tokens {n}: {:?} vs {:?}", o.text, f.text);
            anyhow::ensure!(f.tokens.starts_with(&o.tokens), "not a prefix: {at}");
            if o.finish_reason == Some("length") {
                anyhow::ensure!(o.tokens.len() == n, "`length` before the budget was spent: {at}");
                cut += 1;
            } else {
                anyhow::ensure!(o.tokens == f.tokens && o.finish_reason == f.finish_reason, "{at}");
            }
        }
    }
    // Most budgets are shorter than the answers: the test did cut outputs.
    assert!(cut >= 100, "only {cut}/300 outputs were cut by their budget");
    wait_all_blocks_free(h)?;
    Ok(())
}

#[test]
fn the_grammar_cache_stays_within_its_byte_bound() -> Result<()> {
    let model = smollm2()?;
    let bound = 16 << 20;
    let cfg =
        EngineConfig { grammar: GrammarLimits { cache_bytes: bound, ..GrammarLimits::default() }, ..test_config() };
    let e = start(&model, &cfg)?;
    let h = &e.handle;
    let rss_before = rss_bytes();
    for i in 0..150 {
        // 150 distinct schemas, as many distinct clients would send.
        let mut schema = pet_schema();
        schema["properties"][format!("extra_{i}")] = json!({"type": "string", "maxLength": 8});
        let c = Constraint::json_schema(compact_json_schema(schema));
        drop(h.generate(Prompt::Text(CHAT.into()), constrained(c, None, 1))?);
        let u = h.grammar_cache_usage();
        anyhow::ensure!(u.bytes <= bound && u.max_bytes == bound, "after {} schemas: {u:?}", i + 1);
    }
    let u = h.grammar_cache_usage();
    eprintln!("grammar cache after 150 schemas: {u:?}; RSS grew {} MiB", (rss_bytes() - rss_before) >> 20);
    assert!(u.entries > 0 && u.entries < 150, "the bound evicted some: {u:?}");
    wait_all_blocks_free(h)?;
    Ok(())
}

/// Resident set size of this process (Linux `/proc/self/statm`), 0 where unknown.
fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<i64>().ok()).unwrap_or(0) * 4096
}
