//! `kiln_inference::chat` on the real tokenizers: a conversation with tool calls renders through
//! the model's own template (Qwen2.5) or kiln's generic format (SmolLM2), and `continuation`
//! gives exactly the tokens that turn a session's history (prompt + the model's output, its stop
//! token left out) into the whole next prompt.

use anyhow::{ensure, Context, Result};
use kiln_inference::chat::{self, Conversation, Message, Role, ToolCall, ToolChoice, ToolPlan, ToolSpec};
use kiln_inference::tokenizer::Tokenizer;
use serde_json::{json, Map};

fn plan() -> ToolPlan {
    let params = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    ToolPlan::new(vec![ToolSpec::new("get_weather", Some("Weather of a city"), Some(params))], ToolChoice::Auto, None)
        .expect("valid plan")
}

/// The session's view: history = prompt + output; continuation must complete it to the prompt
/// of the whole conversation sent afresh.
fn check(tok: &Tokenizer, output: &str) -> Result<()> {
    let plan = plan();
    let kwargs = Map::new();
    let mut msgs = vec![Message::new(Role::System, "Be brief."), Message::new(Role::User, "Weather in Oslo?")];
    let conv = |m: &[Message]| -> Vec<u32> {
        chat::render(tok, &Conversation { messages: m, tools: Some(&plan), kwargs: &kwargs }, true).expect("renders")
    };
    let mut history = conv(&msgs);
    history.extend(tok.encode(output, false)?);
    let call = ToolCall { id: "call_1".into(), name: "get_weather".into(), arguments: "{\"city\": \"Oslo\"}".into() };
    msgs.push(Message::assistant_calls("", vec![call]));
    let done = msgs.clone();
    msgs.push(Message::tool_result("call_1", "{\"temperature\": 3}"));
    let cont = chat::continuation(
        tok,
        &Conversation { messages: &done, tools: Some(&plan), kwargs: &kwargs },
        &Conversation { messages: &msgs, tools: Some(&plan), kwargs: &kwargs },
    )
    .context("the template extends the conversation")?;
    ensure!(cont.len() < 40, "continuation is only the new turn: {} tokens", cont.len());
    history.extend(&cont);
    let fresh = conv(&msgs);
    ensure!(
        history == fresh,
        "history + continuation != fresh render:\n{:?}\n{:?}",
        tok.decode(&history, false),
        tok.decode(&fresh, false)
    );
    Ok(())
}

#[test]
fn qwen_native_template_continues_a_tool_turn() -> Result<()> {
    let Some(model) = kiln_tests::qwen25() else { return Ok(()) };
    let tok = Tokenizer::from_gguf_file(&model)?;
    // Exactly what Qwen2.5's template writes for this call, so the two sides must agree.
    check(&tok, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>")
}

#[test]
fn smollm2_generic_format_continues_a_tool_turn() -> Result<()> {
    let tok = Tokenizer::from_gguf_file(&kiln_tests::smollm2()?)?;
    check(&tok, "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}\n</tool_call>")
}
