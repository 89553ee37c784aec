//! The grammar a tool-calling turn must follow, in llguidance's Lark dialect. Each call is
//! `\n{"name": "<one of the tools>", "arguments": <JSON valid under that tool's schema>}\n</tool_call>`;
//! name and arguments are one alternative per tool, so choosing a name fixes the schema.
//!
//! - `required` / named: the whole output is `<tool_call>` + calls.
//! - `auto`: free text until the model itself writes `<tool_call>`; the grammar (without the
//!   opening tag) engages right after it (the engine's trigger).
//! - `parallel_tool_calls: false`: exactly one call, then the turn ends.

use super::{Choice, ToolPlan, CALL_CLOSE, CALL_OPEN};
use kiln_inference::grammar::compact_json_schema;
use kiln_inference::Constraint;
use std::fmt::Write;

/// The constraint for a plan; `None` when calls are forbidden (the text is free).
pub fn constraint(plan: &ToolPlan) -> Option<Constraint> {
    match plan.choice {
        Choice::None => None,
        Choice::Auto => Some(Constraint { trigger: Some(CALL_OPEN.to_string()), ..Constraint::lark(lark(plan, false)) }),
        Choice::Required | Choice::Named(_) => Some(Constraint::lark(lark(plan, true))),
    }
}

fn lit(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

fn lark(plan: &ToolPlan, with_open_tag: bool) -> String {
    let mut g = String::from("start: ");
    if with_open_tag {
        g.push_str(&lit(CALL_OPEN));
        g.push(' ');
    }
    g.push_str("call");
    if plan.parallel {
        let _ = write!(g, " ({} call)*", lit(&format!("\n{CALL_OPEN}")));
    }
    g.push('\n');
    let tools = plan.callable();
    let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("fn_{i}")).collect();
    let _ = writeln!(g, "call: {} ({}) {}", lit("\n"), alternatives.join(" | "), lit(&format!("\n{CALL_CLOSE}")));
    for (i, t) in tools.iter().enumerate() {
        let head = format!("{{\"name\": \"{}\", \"arguments\": ", t.name);
        let _ = writeln!(g, "fn_{i}: {} args_{i} {}", lit(&head), lit("}"));
        let _ = writeln!(g, "args_{i}: %json {}", compact_json_schema(t.parameters.clone()));
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn grammar_text() {
        let tools = [json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})];
        let plan = ToolPlan::from_request(Some(&tools), Some(&json!("required")), Some(false)).unwrap().unwrap();
        let g = lark(&plan, true);
        assert!(g.starts_with("start: \"<tool_call>\" call\n"), "{g}");
        assert!(g.contains("fn_0: \"{\\\"name\\\": \\\"get_weather\\\", \\\"arguments\\\": \" args_0 \"}\""), "{g}");
        assert!(g.contains("args_0: %json {"), "{g}");
        let auto = ToolPlan { choice: Choice::Auto, parallel: true, ..plan };
        let c = constraint(&auto).unwrap();
        assert_eq!(c.trigger.as_deref(), Some(CALL_OPEN));
        let none = ToolPlan { choice: Choice::None, ..auto };
        assert!(constraint(&none).is_none());
    }
}
