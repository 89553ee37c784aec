//! `kiln_agent::turn` on Qwen2.5-Coder: a tool-calling turn in a session, then a turn that adds
//! the tool result, which prefills only the result (plus the closing of the previous turn), and
//! whose output equals the same conversation sent whole to an engine with caching off.

use anyhow::{ensure, Result};
use kiln_agent::turn::{ModelSession, TurnSpec};
use kiln_inference::chat::{Message, Role, ToolChoice, ToolPlan, ToolSpec};
use kiln_inference::engine::EngineConfig;
use kiln_inference::{FinishReason, SamplingParams};
use kiln_tests::{start, test_config};
use serde_json::json;

fn plan(choice: ToolChoice) -> ToolPlan {
    let params = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    ToolPlan::new(vec![ToolSpec::new("get_weather", Some("Current weather of a city"), Some(params))], choice, None)
        .expect("valid plan")
}

fn spec<'a>(messages: &'a [Message], tools: &'a ToolPlan) -> TurnSpec<'a> {
    TurnSpec {
        messages,
        tools: Some(tools),
        callable: &[],
        answer_schema: None,
        answer_only: false,
        params: SamplingParams { max_tokens: Some(60), ..SamplingParams::greedy() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_turn_prefills_only_the_tool_result() -> Result<()> {
    let Some(model) = kiln_tests::qwen25() else { return Ok(()) };
    let eng = start(&model, &test_config())?;
    let fresh = start(&model, &EngineConfig { enable_prefix_caching: false, ..test_config() })?;
    let mut session = ModelSession::new(eng.handle.clone());
    let required = plan(ToolChoice::Required);
    let mut msgs = vec![
        Message::new(Role::System, "You are a weather assistant."),
        Message::new(Role::User, "What is the weather in Oslo?"),
    ];
    let first = session.turn(spec(&msgs, &required), &mut |_| {}).await?;
    ensure!(first.finish == FinishReason::ToolCalls && first.calls.len() == 1, "{first:?}");
    ensure!(first.calls[0].name == "get_weather", "{first:?}");
    msgs.push(first.message());
    msgs.push(Message::tool_result(&first.calls[0].id, "{\"temperature_c\": 3, \"sky\": \"snow\"}"));
    let none = plan(ToolChoice::None);
    let auto = plan(ToolChoice::Auto);
    let mut text = String::new();
    // Same tools as the first turn (`auto`), so the session continues without re-rendering.
    let second = session.turn(spec(&msgs, &auto), &mut |t| text.push_str(t)).await?;
    let appended = second.prompt_tokens - second.cached_tokens;
    ensure!(appended < 40, "second turn prefilled {appended} of {} tokens", second.prompt_tokens);
    ensure!(text == second.content, "streamed text equals the content");
    let mut alone = ModelSession::new(fresh.handle.clone());
    let again = alone.turn(spec(&msgs, &auto), &mut |_| {}).await?;
    ensure!(again.cached_tokens == 0);
    ensure!(again.content == second.content && again.calls.len() == second.calls.len(), "{again:?} vs {second:?}");
    // A turn under `none` is text, never a call.
    let mut third = ModelSession::new(eng.handle.clone());
    let out = third.turn(spec(&msgs, &none), &mut |_| {}).await?;
    ensure!(out.calls.is_empty() && !out.content.contains("<tool_call>"), "{out:?}");
    Ok(())
}
