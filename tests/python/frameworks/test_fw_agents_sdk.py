"""The OpenAI Agents SDK (`openai-agents`) with its default model, the Responses API, pointed at
kiln: an agent with two function tools (the call executed by the SDK, the run ending with a
final output), streamed with `Runner.run_streamed`, and with a pydantic `output_type` (the SDK
then sends `tools` and `text.format` together). `stop_on_first_tool`: see conftest.py."""

import asyncio

import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

agents = pytest.importorskip("agents")
from agents import Agent, ModelSettings, Runner, function_tool  # noqa: E402

CALLS = []
CLIENT = None  # the client of the running `run`, for direct checks


@function_tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    CALLS.append(("get_weather", city))
    return f"Sunny, 21 C in {city}"


@function_tool
def get_population(city: str) -> int:
    """Get the number of people living in a city."""
    CALLS.append(("get_population", city))
    return 2_100_000


class Weather(BaseModel):
    city: str
    summary: str


def run(qwen, main):
    """Runs `main()` in one event loop with a fresh default client (an async client must not
    outlive the loop it was used in)."""

    async def go():
        global CLIENT
        client = CLIENT = AsyncOpenAI(base_url=qwen[0], api_key="unused", max_retries=0, timeout=300)
        agents.set_default_openai_client(client, use_for_tracing=False)
        agents.set_default_openai_api("responses")
        agents.set_tracing_disabled(True)
        return await main()

    return asyncio.run(go())


def tool_agent(model):
    return Agent(
        name="city-facts",
        instructions="Answer questions about cities with the tools.",
        model=model,
        tools=[get_weather, get_population],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(temperature=0),
    )


def test_two_tools_run_to_a_final_output(qwen):
    CALLS.clear()
    r = run(qwen, lambda: Runner.run(tool_agent(qwen[1]), "What is the weather in Paris?"))
    assert CALLS == [("get_weather", "Paris")]
    assert r.final_output == "Sunny, 21 C in Paris"
    r = run(qwen, lambda: Runner.run(tool_agent(qwen[1]), "How many people live in Berlin?"))
    assert CALLS[-1] == ("get_population", "Berlin") and r.final_output == "2100000"


def test_streamed_run(qwen):
    async def streamed():
        result = Runner.run_streamed(tool_agent(qwen[1]), "What is the weather in Rome?")
        items = [e.item.type async for e in result.stream_events() if e.type == "run_item_stream_event"]
        return result, items

    CALLS.clear()
    result, items = run(qwen, streamed)
    assert items == ["tool_call_item", "tool_call_output_item"]
    assert CALLS == [("get_weather", "Rome")] and result.final_output == "Sunny, 21 C in Rome"


def test_output_type_with_tools(qwen):
    agent = Agent(
        name="weather-report",
        instructions="Answer with the structured output; use the tools when they help.",
        model=qwen[1],
        tools=[get_weather, get_population],
        output_type=Weather,
        model_settings=ModelSettings(temperature=0),
    )
    r = run(qwen, lambda: Runner.run(agent, "Describe the weather of London in one sentence.", max_turns=6))
    assert isinstance(r.final_output, Weather) and r.final_output.summary


def test_previous_response_id_chain(qwen):
    """The SDK's server-side conversation: the second run sends only its new input and
    `previous_response_id`; kiln continues the stored chain on the parked session's K/V."""
    agent = Agent(name="memory", instructions="Be helpful.", model=qwen[1], model_settings=ModelSettings(temperature=0))

    async def chain():
        first = await Runner.run(agent, "My name is Ada. Reply OK.")
        second = await Runner.run(agent, "What is my name?", previous_response_id=first.last_response_id)
        return [await CLIENT.responses.retrieve(r.last_response_id) for r in (first, second)], second

    (r1, r2), second = run(qwen, chain)
    assert r2.previous_response_id == r1.id and "Ada" in second.final_output
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 2


def test_hosted_mcp_tool_runs_in_kiln(qwen):
    """The SDK's `HostedMCPTool` naming kiln's builtins (`server_label: "kiln"`): the tool runs in
    kiln's own loop, its call comes back as an `mcp_call` item with the exact result; streamed
    too. No `stop_on_first_tool` needed: kiln's loop guard ends the repeats."""
    calc = agents.HostedMCPTool(
        tool_config={"type": "mcp", "server_label": "kiln", "allowed_tools": ["calculator"], "require_approval": "never"}
    )
    agent = Agent(
        name="calc",
        instructions="Use the calculator tool for arithmetic, then answer in one short sentence.",
        model=qwen[1],
        tools=[calc],
        model_settings=ModelSettings(temperature=0),
    )
    r = run(qwen, lambda: Runner.run(agent, "What is 1234 * 5678?"))
    calls = [i.raw_item for i in r.new_items if getattr(i.raw_item, "type", None) == "mcp_call"]
    assert calls and all(c.name == "calculator" and c.output == "7006652" for c in calls), r.new_items
    assert r.final_output

    async def streamed():
        result = Runner.run_streamed(agent, "What is 1234 * 5678?")
        items = [e.item.type async for e in result.stream_events() if e.type == "run_item_stream_event"]
        return result, items

    result, items = run(qwen, streamed)
    assert "tool_call_item" in items and items[-1] == "message_output_item", items
    assert result.final_output
