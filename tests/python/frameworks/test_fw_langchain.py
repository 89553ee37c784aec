"""LangChain `ChatOpenAI(use_responses_api=True, use_previous_response_id=True)` with `bind_tools`
against kiln: the tool call comes back as `tool_calls`, its result is sent as a `ToolMessage`
continuing the stored response (only the new items travel; kiln holds the rest), and the model
answers (`tool_choice="none"` on that turn, see conftest.py). Streaming accumulates the call."""

import openai
import pytest

pytest.importorskip("langchain_openai")
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"Sunny, 21 C in {city}"


def llm(qwen):
    base_url, name = qwen
    return ChatOpenAI(
        model=name,
        base_url=base_url,
        api_key="unused",
        temperature=0,
        max_retries=0,
        use_responses_api=True,
        use_previous_response_id=True,
    )


def test_bind_tools_and_previous_response_id(qwen):
    msgs = [HumanMessage("What is the weather in Paris?")]
    ai = llm(qwen).bind_tools([get_weather]).invoke(msgs)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    msgs += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm(qwen).bind_tools([get_weather], tool_choice="none").invoke(msgs)
    assert not final.tool_calls and final.text.strip()
    # The second request continued the first response: only the tool result was sent.
    client = openai.OpenAI(base_url=qwen[0], api_key="unused", max_retries=0)
    stored = client.responses.retrieve(final.response_metadata["id"])
    assert stored.previous_response_id == ai.response_metadata["id"]
    assert [i.type for i in client.responses.input_items.list(stored.id).data] == ["function_call_output"]
    assert final.usage_metadata["input_token_details"]["cache_read"] > 0


def test_streamed_tool_call(qwen):
    chunks = list(llm(qwen).bind_tools([get_weather]).stream([HumanMessage("What is the weather in Oslo?")]))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "Oslo"})]
