"""Fixtures of the agent-framework tests: each framework, unchanged, talks to the Qwen2.5-Coder-0.5B
`kiln serve` that run.sh starts (KILN_QWEN_BASE_URL / KILN_QWEN_MODEL); without it they skip.

Qwen2.5-Coder-0.5B re-calls a tool after nearly every tool result (p ~ 0.93), so a loop the client
drives until the model stops calling tools never ends on it. Where that matters the tests use the
framework's own way to end after a tool: the Agents SDK's `tool_use_behavior="stop_on_first_tool"`,
Pydantic AI's structured `output_type` (the model ends the run by calling its output tool), and an
explicit `tool_choice="none"` for LangChain's second turn.
"""

import os

import pytest

QWEN_BASE_URL = os.environ.get("KILN_QWEN_BASE_URL")
QWEN_MODEL = os.environ.get("KILN_QWEN_MODEL", "qwen2.5-coder-0.5b-instruct-q4_k_m")


@pytest.fixture(scope="session")
def qwen():
    """(base_url, model) of the Qwen server, or a skip."""
    if not QWEN_BASE_URL:
        print("SKIP: Qwen2.5-Coder-0.5B is not fetched (scripts/fetch-models.sh qwen)")
        pytest.skip("Qwen2.5-Coder-0.5B-Instruct is not fetched")
    return QWEN_BASE_URL, QWEN_MODEL
