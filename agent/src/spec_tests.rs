//! Unit tests of `spec.rs`: one test (at least) per rule, each asserting the field it names.

use super::*;
use serde_json::json;

const FULL: &str = r#"
name = "support-bot"
description = "answers tickets"
instructions = "You help {{ customer }}."
model = "smollm2"
tools = ["search", "lookup"]
max_steps = 5
max_tokens_per_step = 256
temperature = 0.2
output_schema = { type = "object", properties = { answer = { type = "string" } } }

[tool_rules]
terminal = ["search"]
max_calls_per_step = 2
requires_approval = ["lookup"]

[[http_tools]]
name = "lookup"
method = "GET"
url = "https://api.example.com/items/{id}"
parameters = { type = "object", properties = { id = { type = "string" } } }
"#;

fn ctx() -> SpecContext {
    SpecContext { models: vec!["smollm2".into(), "qwen".into()], tools: ["search".to_string()].into_iter().collect() }
}

fn base() -> AgentSpec {
    AgentSpec::from_json(json!({"name": "a", "model": "smollm2"})).unwrap()
}

fn field_of(r: Result<(), SpecError>) -> String {
    r.expect_err("expected a validation error").field
}

#[test]
fn full_toml_parses_and_validates() {
    let spec = AgentSpec::from_toml_str(FULL).unwrap();
    assert_eq!(spec.name, "support-bot");
    assert_eq!(spec.max_steps, 5);
    assert_eq!(spec.tool_rules.max_calls_per_step, Some(2));
    assert_eq!(spec.http_tools[0].url, "https://api.example.com/items/{id}");
    spec.validate(&ctx()).unwrap();
    assert_eq!(spec.tool_names(), vec!["search", "lookup"]);
}

#[test]
fn defaults_apply() {
    let spec = base();
    assert_eq!(spec.description, "");
    assert_eq!(spec.max_steps, 10);
    assert_eq!(spec.max_tokens_per_step, 512);
    assert!(spec.tools.is_empty() && spec.http_tools.is_empty());
    assert_eq!(spec.tool_rules, ToolRules::default());
    assert_eq!(spec.temperature, None);
    spec.validate(&ctx()).unwrap();
}

#[test]
fn toml_and_json_share_field_names() {
    let from_toml = AgentSpec::from_toml_str(FULL).unwrap();
    let from_json = AgentSpec::from_json(from_toml.to_json()).unwrap();
    assert_eq!(from_toml, from_json);
    assert_eq!(from_toml.to_json()["temperature"], json!(0.2));
}

#[test]
fn unknown_field_names_the_field() {
    let e = AgentSpec::from_json(json!({"name": "a", "model": "m", "max_step": 3})).unwrap_err();
    assert_eq!(e.field, "max_step", "{e}");
    let e = AgentSpec::from_json(json!({"name": "a", "model": "m", "tool_rules": {"terminl": []}})).unwrap_err();
    assert_eq!(e.field, "tool_rules.terminl", "{e}");
    let e =
        AgentSpec::from_json(json!({"name": "a", "model": "m", "http_tools": [{"name": "x", "url": "u", "rules": 1}]}))
            .unwrap_err();
    assert_eq!(e.field, "http_tools[0].rules", "{e}");
    let e = AgentSpec::from_toml_str("name = \"a\"\nmodel = \"m\"\nbogus = 1\n").unwrap_err();
    assert_eq!(e.field, "bogus", "{e}");
}

#[test]
fn missing_field_names_the_field() {
    let e = AgentSpec::from_json(json!({"name": "a"})).unwrap_err();
    assert_eq!(e.field, "model", "{e}");
    let e = AgentSpec::from_toml_str("model = \"m\"\n").unwrap_err();
    assert_eq!(e.field, "name", "{e}");
    let e = AgentSpec::from_json(json!({"name": "a", "model": "m", "http_tools": [{"name": "x"}]})).unwrap_err();
    assert_eq!(e.field, "http_tools[0].url", "{e}");
}

#[test]
fn wrong_type_names_the_nested_field() {
    let e = AgentSpec::from_json(json!({"name": "a", "model": "m", "tool_rules": {"terminal": [1]}})).unwrap_err();
    assert_eq!(e.field, "tool_rules.terminal[0]", "{e}");
    let e = AgentSpec::from_toml_str("name = \"a\"\nmodel = \"m\"\nmax_steps = \"ten\"\n").unwrap_err();
    assert_eq!(e.field, "max_steps", "{e}");
    let e = AgentSpec::from_json(json!({"name": "a", "model": "m", "max_steps": -1})).unwrap_err();
    assert_eq!(e.field, "max_steps", "{e}");
}

#[test]
fn toml_syntax_error_is_reported() {
    let e = AgentSpec::from_toml_str("name = \n").unwrap_err();
    assert!(!e.message.is_empty());
}

#[test]
fn name_rules() {
    for bad in ["", "has space", "dot.ted", "ünï", &"x".repeat(65)] {
        let spec = AgentSpec { name: bad.to_string(), ..base() };
        assert_eq!(field_of(spec.validate(&ctx())), "name", "{bad:?}");
    }
    for good in ["a", "A-b_9", &"x".repeat(64)] {
        AgentSpec { name: good.to_string(), ..base() }.validate(&ctx()).unwrap();
    }
}

#[test]
fn model_must_be_served() {
    let spec = AgentSpec { model: "gpt-9".into(), ..base() };
    let e = spec.validate(&ctx()).unwrap_err();
    assert_eq!(e.field, "model");
    assert!(e.message.contains("gpt-9"), "{e}");
}

#[test]
fn tools_must_be_known_and_unique() {
    let spec = AgentSpec { tools: vec!["search".into(), "nope".into()], ..base() };
    assert_eq!(field_of(spec.validate(&ctx())), "tools[1]");
    let spec = AgentSpec { tools: vec!["search".into(), "search".into()], ..base() };
    assert_eq!(field_of(spec.validate(&ctx())), "tools[1]");
}

fn http(name: &str) -> HttpToolDef {
    HttpToolDef {
        name: name.into(),
        description: String::new(),
        method: "GET".into(),
        url: "https://example.com/x".into(),
        parameters: None,
    }
}

#[test]
fn own_http_tools_count_as_known() {
    let spec = AgentSpec { tools: vec!["mine".into()], http_tools: vec![http("mine")], ..base() };
    spec.validate(&ctx()).unwrap();
    assert_eq!(spec.tool_names(), vec!["mine"]);
}

#[test]
fn http_tool_rules() {
    let with = |t: HttpToolDef| AgentSpec { http_tools: vec![http("ok"), t], ..base() };
    assert_eq!(field_of(with(http("bad name")).validate(&ctx())), "http_tools[1].name");
    assert_eq!(field_of(with(http("ok")).validate(&ctx())), "http_tools[1].name");
    assert_eq!(field_of(with(http("search")).validate(&ctx())), "http_tools[1].name");
    let t = HttpToolDef { method: "FETCH".into(), ..http("t") };
    assert_eq!(field_of(with(t).validate(&ctx())), "http_tools[1].method");
    let t = HttpToolDef { url: "ftp://x".into(), ..http("t") };
    assert_eq!(field_of(with(t).validate(&ctx())), "http_tools[1].url");
    let t = HttpToolDef { parameters: Some(json!({"type": "string"})), ..http("t") };
    assert_eq!(field_of(with(t).validate(&ctx())), "http_tools[1].parameters");
    let t = HttpToolDef { method: "post".into(), parameters: Some(json!({"type": "object"})), ..http("t") };
    with(t).validate(&ctx()).unwrap();
}

#[test]
fn max_steps_bounds() {
    for (n, ok) in [(0, false), (1, true), (100, true), (101, false)] {
        let r = AgentSpec { max_steps: n, ..base() }.validate(&ctx());
        assert_eq!(r.is_ok(), ok, "max_steps {n}");
        if !ok {
            assert_eq!(field_of(r), "max_steps");
        }
    }
}

#[test]
fn max_tokens_per_step_at_least_one() {
    assert_eq!(field_of(AgentSpec { max_tokens_per_step: 0, ..base() }.validate(&ctx())), "max_tokens_per_step");
    AgentSpec { max_tokens_per_step: 1, ..base() }.validate(&ctx()).unwrap();
}

#[test]
fn temperature_range() {
    for t in [-0.1, 2.5, f32::NAN] {
        assert_eq!(field_of(AgentSpec { temperature: Some(t), ..base() }.validate(&ctx())), "temperature");
    }
    AgentSpec { temperature: Some(0.0), ..base() }.validate(&ctx()).unwrap();
}

#[test]
fn output_schema_must_be_object_schema() {
    for bad in [json!("x"), json!({"type": "array"}), json!({}), json!([1])] {
        let r = AgentSpec { output_schema: Some(bad.clone()), ..base() }.validate(&ctx());
        assert_eq!(field_of(r), "output_schema", "{bad}");
    }
    AgentSpec { output_schema: Some(json!({"type": "object"})), ..base() }.validate(&ctx()).unwrap();
}

#[test]
fn tool_rules_name_the_agents_tools() {
    let tools = vec!["search".to_string()];
    let rules = ToolRules { terminal: vec!["search".into(), "other".into()], ..Default::default() };
    let spec = AgentSpec { tools: tools.clone(), tool_rules: rules, ..base() };
    assert_eq!(field_of(spec.validate(&ctx())), "tool_rules.terminal[1]");
    // Known to the server but not enabled for this agent is still an error.
    let rules = ToolRules { requires_approval: vec!["search".into()], ..Default::default() };
    assert_eq!(field_of(AgentSpec { tool_rules: rules, ..base() }.validate(&ctx())), "tool_rules.requires_approval[0]");
    let rules = ToolRules { max_calls_per_step: Some(0), ..Default::default() };
    let spec = AgentSpec { tools, tool_rules: rules, ..base() };
    assert_eq!(field_of(spec.validate(&ctx())), "tool_rules.max_calls_per_step");
}

#[test]
fn instructions_compile_at_validation() {
    let spec = AgentSpec { instructions: "Hello {{ name ".into(), ..base() };
    assert_eq!(field_of(spec.validate(&ctx())), "instructions");
    let spec = AgentSpec { instructions: "{% if x %}open".into(), ..base() };
    assert_eq!(field_of(spec.validate(&ctx())), "instructions");
}

#[test]
fn render_instructions_with_variables() {
    let spec = AgentSpec { instructions: "Help {{ user.name }} with {{ topic | upper }}.".into(), ..base() };
    let vars = json!({"user": {"name": "Ada"}, "topic": "billing"});
    let out = spec.render_instructions(vars.as_object().unwrap()).unwrap();
    assert_eq!(out, "Help Ada with BILLING.");
    // Globals and names the template defines itself are not run variables.
    let spec = AgentSpec { instructions: "{% set n = 2 %}{% for i in range(n) %}{{ i }}{% endfor %}".into(), ..base() };
    assert_eq!(spec.render_instructions(&Map::new()).unwrap(), "01");
}

#[test]
fn render_instructions_missing_variable_is_an_error() {
    let spec = AgentSpec { instructions: "Help {{ user }} and {{ other }}.".into(), ..base() };
    let vars = json!({"user": "Ada"});
    let e = spec.render_instructions(vars.as_object().unwrap()).unwrap_err();
    assert_eq!(e.field, "variables");
    assert!(e.message.contains("other"), "{e}");
    // A missing attribute of a present variable is still an error under strict undefined.
    let spec = AgentSpec { instructions: "{{ user.name }}".into(), ..base() };
    let e = spec.render_instructions(json!({"user": {}}).as_object().unwrap()).unwrap_err();
    assert_eq!(e.field, "variables", "{e}");
}

#[test]
fn patch_merges_and_deletes() {
    let spec = AgentSpec::from_toml_str(FULL).unwrap();
    let patched = spec
        .apply_patch(json!({"max_steps": 7, "temperature": null, "tool_rules": {"max_calls_per_step": null}}))
        .unwrap();
    assert_eq!(patched.max_steps, 7);
    assert_eq!(patched.temperature, None);
    assert_eq!(patched.tool_rules.max_calls_per_step, None);
    assert_eq!(patched.tool_rules.terminal, vec!["search"]);
    assert_eq!(patched.description, spec.description);
    // Deleting a defaulted field restores its default.
    assert_eq!(spec.apply_patch(json!({"max_steps": null})).unwrap().max_steps, 10);
}

#[test]
fn patch_cannot_rename_or_add_unknown_fields() {
    let spec = base();
    assert_eq!(spec.apply_patch(json!({"name": "b"})).unwrap_err().field, "name");
    assert_eq!(spec.apply_patch(json!({"name": null})).unwrap_err().field, "name");
    spec.apply_patch(json!({"name": "a"})).unwrap();
    assert_eq!(spec.apply_patch(json!({"colour": "red"})).unwrap_err().field, "colour");
    assert_eq!(spec.apply_patch(json!([1])).unwrap_err().field, "");
    assert_eq!(spec.apply_patch(json!({"max_steps": "x"})).unwrap_err().field, "max_steps");
}

#[test]
fn load_dir_reads_toml_files_and_names_the_bad_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agents");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("b.toml"), "name = \"b\"\nmodel = \"smollm2\"\n").unwrap();
    std::fs::write(dir.join("a.toml"), "name = \"a\"\nmodel = \"smollm2\"\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "not an agent").unwrap();
    let specs = load_dir(&dir).unwrap();
    assert_eq!(specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);

    std::fs::write(dir.join("c.toml"), "name = \"c\"\nmodel = \"smollm2\"\nmax_steps = \"x\"\n").unwrap();
    let e = load_dir(&dir).unwrap_err();
    assert!(e.field.contains("c.toml") && e.field.ends_with("max_steps"), "{e}");

    std::fs::write(dir.join("c.toml"), "name = \"a\"\nmodel = \"smollm2\"\n").unwrap();
    let e = load_dir(&dir).unwrap_err();
    assert!(e.field.contains("c.toml") && e.message.contains("twice"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();

    let e = load_dir(&dir).unwrap_err();
    assert!(e.field.ends_with("agents"), "{e}");
}

#[test]
fn integer_temperature_is_accepted() {
    let spec = AgentSpec::from_toml_str("name = \"a\"\nmodel = \"m\"\ntemperature = 1\n").unwrap();
    assert_eq!(spec.temperature, Some(1.0));
    let spec = AgentSpec::from_json(json!({"name": "a", "model": "m", "temperature": 1})).unwrap();
    assert_eq!(spec.temperature, Some(1.0));
}
