"""Pydantic AI with `OpenAIResponsesModel` and with `OpenAIChatModel` against kiln: an agent with two
function tools and a structured `output_type`; the tool is called, its result goes back to the
model, and the run ends when the model calls the output tool (see conftest.py for why the output
type: with plain `str` output Qwen2.5-Coder-0.5B re-calls the tool until the request limit)."""

import pytest
from pydantic import BaseModel

pytest.importorskip("pydantic_ai")
from pydantic_ai import Agent  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402
from pydantic_ai.usage import UsageLimits  # noqa: E402

CALLS = []


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    CALLS.append(("get_weather", city))
    return f"Sunny, 21 C in {city}"


def get_population(city: str) -> int:
    """Get the number of people living in a city."""
    CALLS.append(("get_population", city))
    return 2_100_000


class Weather(BaseModel):
    city: str
    summary: str


@pytest.mark.parametrize("model_class", [OpenAIResponsesModel, OpenAIChatModel])
def test_tools_then_structured_output(qwen, model_class):
    base_url, name = qwen
    model = model_class(name, provider=OpenAIProvider(base_url=base_url, api_key="unused"))
    agent = Agent(
        model,
        tools=[get_weather, get_population],
        output_type=Weather,
        instructions="Use the tools, then give the final result.",
        model_settings={"temperature": 0},
    )
    CALLS.clear()
    r = agent.run_sync("What is the weather in Paris?", usage_limits=UsageLimits(request_limit=12))
    assert ("get_weather", "Paris") in CALLS
    assert isinstance(r.output, Weather) and r.output.city == "Paris"
    returns = [p for m in r.all_messages() for p in m.parts if type(p).__name__ == "ToolReturnPart"]
    assert any(p.tool_name == "get_weather" and "Sunny" in str(p.content) for p in returns)
