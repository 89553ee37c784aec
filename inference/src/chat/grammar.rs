//! The grammar a tool-calling turn must follow, in llguidance's Lark dialect. Each call is
//! `\n{"name": "<one of the tools>", "arguments": <JSON valid under that tool's schema>}\n</tool_call>`;
//! name and arguments are one alternative per tool, so choosing a name fixes the schema.
//!
//! - `required` / named: the whole output is `<tool_call>` + calls.
//! - `auto`: free text until the model itself starts a call, then the grammar (the engine's
//!   triggers): `<tool_call>` anywhere, or, as the very first output, a bare `{"name"` object
//!   or a ```` ```json ```` block, which small models such as Qwen2.5-Coder-0.5B write instead of
//!   the tag (llama.cpp accepts those forms too). A bare or fenced call is a single call.
//! - `parallel_tool_calls: false`: exactly one call, then the turn ends.
//!
//! Parameter objects that list `properties` are closed (no other key) unless the schema says
//! `additionalProperties` (OpenAI strict mode, xgrammar): see `closed_objects`.

use super::{ToolChoice, ToolPlan, BARE_OPEN, CALL_CLOSE, CALL_OPEN, FENCE_CLOSE, FENCE_OPEN};
use crate::grammar::{closed_objects, inline_json_schema, Constraint, Trigger};
use std::fmt::Write;

/// The constraint for a plan: for `none`, free text that does not open with a call.
pub fn constraint(plan: &ToolPlan) -> Option<Constraint> {
    match plan.choice {
        ToolChoice::None => Some(Constraint::lark(no_call_lark())),
        ToolChoice::Auto => {
            let triggers = vec![
                Trigger { text: CALL_OPEN.to_string(), at_start: false },
                Trigger { text: BARE_OPEN.to_string(), at_start: true },
                Trigger { text: FENCE_OPEN.to_string(), at_start: true },
            ];
            Some(Constraint { triggers, ..Constraint::lark(lark(plan, true)) })
        }
        ToolChoice::Required | ToolChoice::Named(_) => Some(Constraint::lark(lark(plan, false))),
    }
}

/// Tools beside a structured final answer (the Responses API's `text.format` with `tools`, as
/// the OpenAI Agents SDK sends for an `output_type`): the whole output is either tagged calls or
/// one JSON value under `answer` (a schema with its JSON options, see `compact_json_schema`).
/// Engaged from the first token: no bare or fenced call, so an answer whose first key is `name`
/// can never be read as a call. Under `none`, only the answer.
pub fn constraint_with_answer(plan: &ToolPlan, answer: serde_json::Value) -> Constraint {
    match plan.choice {
        ToolChoice::None => Constraint::json_schema(answer),
        ToolChoice::Required | ToolChoice::Named(_) => Constraint::lark(lark(plan, false)),
        ToolChoice::Auto => {
            let calls = lark(plan, false);
            let rest = calls.strip_prefix("start: tagged\n").unwrap_or(&calls);
            Constraint::lark(format!("start: tagged | answer\nanswer: %json {answer}\n{rest}"))
        }
    }
}

/// `none`: any text except one that opens the way `auto` takes for a call, a bare `{"name`...
/// object or one in a ```` ```json ```` block (the tag itself is a banned token, see chat.rs).
/// Without this a model that answers tool results with another call (Qwen2.5-Coder-0.5B does,
/// at p = 0.93) writes that call as content instead of the answer `none` asks for. `"name` and
/// not `"name"`: barred from the latter, that model wrote `{"name}: "get_weather", ...`.
fn no_call_lark() -> String {
    let ws = "[ \\t\\r\\n]*";
    format!("start: TEXT\nTEXT: /(?s:.*)/ & ~/{ws}(```json{ws})?\\{{{ws}\"name(?s:.*)/\n")
}

fn lit(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

fn lark(plan: &ToolPlan, allow_bare: bool) -> String {
    let mut g = String::from("start: tagged");
    if allow_bare {
        let _ = write!(g, " | body | {} body {}", lit(&format!("{FENCE_OPEN}\n")), lit(&format!("\n{FENCE_CLOSE}")));
    }
    let _ = write!(g, "\ntagged: {} call", lit(CALL_OPEN));
    if plan.parallel {
        let _ = write!(g, " ({} call)*", lit(&format!("\n{CALL_OPEN}")));
    }
    let _ = writeln!(g, "\ncall: {} body {}", lit("\n"), lit(&format!("\n{CALL_CLOSE}")));
    let tools = plan.callable();
    let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("fn_{i}")).collect();
    let _ = writeln!(g, "body: {}", alternatives.join(" | "));
    for (i, t) in tools.iter().enumerate() {
        let head = format!("{{\"name\": \"{}\", \"arguments\": ", t.name);
        let _ = writeln!(g, "fn_{i}: {} args_{i} {}", lit(&head), lit("}"));
        let _ = writeln!(g, "args_{i}: %json {}", inline_json_schema(closed_objects(t.parameters.clone())));
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn grammar_text() {
        let params = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let tools = vec![super::super::ToolSpec::new("get_weather", None, Some(params))];
        let plan = ToolPlan::new(tools, ToolChoice::Required, Some(false)).unwrap();
        let g = lark(&plan, false);
        assert!(g.starts_with("start: tagged\ntagged: \"<tool_call>\" call\n"), "{g}");
        assert!(g.contains("fn_0: \"{\\\"name\\\": \\\"get_weather\\\", \\\"arguments\\\": \" args_0 \"}\""), "{g}");
        assert!(g.contains("args_0: %json {"), "{g}");
        let auto = ToolPlan { choice: ToolChoice::Auto, parallel: true, ..plan };
        let c = constraint(&auto).unwrap();
        assert_eq!(c.triggers.len(), 3);
        assert!(
            matches!(&c.grammar, crate::Grammar::Lark(g) if g.starts_with("start: tagged | body | \"```json\\n\" body \"\\n```\"\n"))
        );
        let none = constraint(&ToolPlan { choice: ToolChoice::None, ..auto.clone() }).unwrap();
        assert!(none.triggers.is_empty());
        let expected =
            "start: TEXT\nTEXT: /(?s:.*)/ & ~/[ \\t\\r\\n]*(```json[ \\t\\r\\n]*)?\\{[ \\t\\r\\n]*\"name(?s:.*)/\n";
        assert_eq!(none.grammar, crate::Grammar::Lark(expected.into()));
        let answer = json!({"type": "object"});
        let both = constraint_with_answer(&auto, answer.clone());
        assert!(both.triggers.is_empty());
        assert!(
            matches!(&both.grammar, crate::Grammar::Lark(g) if g.starts_with("start: tagged | answer\nanswer: %json {\"type\":\"object\"}\ntagged: "))
        );
        let only = constraint_with_answer(&ToolPlan { choice: ToolChoice::None, ..auto }, answer.clone());
        assert_eq!(only, Constraint::json_schema(answer));
    }
}
