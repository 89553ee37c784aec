"""Shared fixtures of the OpenAI-SDK conformance suite.

`run.sh` starts two real `kiln serve` processes and passes their addresses in the environment:
KILN_BASE_URL (no API keys) and KILN_AUTH_BASE_URL (started with --api-key KILN_API_KEY). When
Qwen2.5-Coder-0.5B-Instruct is fetched (`scripts/fetch-models.sh qwen`) it starts a third one on
it: KILN_QWEN_BASE_URL / KILN_QWEN_MODEL (the tool-calling tests skip without it).
"""

import os
import re
import time

import httpx
import openai
import pytest

BASE_URL = os.environ["KILN_BASE_URL"]  # http://127.0.0.1:PORT/v1
AUTH_BASE_URL = os.environ.get("KILN_AUTH_BASE_URL")
API_KEY = os.environ.get("KILN_API_KEY", "")
MODEL = os.environ.get("KILN_MODEL", "smollm2-135m-instruct-q4_1")
QWEN_BASE_URL = os.environ.get("KILN_QWEN_BASE_URL")
QWEN_MODEL = os.environ.get("KILN_QWEN_MODEL", "qwen2.5-coder-0.5b-instruct-q4_k_m")


def root(base_url):
    """`http://host:port/v1` -> `http://host:port` (where /health, /metrics, /tokenize live)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


@pytest.fixture(scope="session")
def model():
    return MODEL


@pytest.fixture(scope="session")
def client():
    # No retries: a retried 5xx or 429 would hide the very failures this suite looks for.
    return openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def qwen_client():
    """A client of the Qwen2.5-Coder-0.5B server, or a skip when run.sh did not start one."""
    if not QWEN_BASE_URL:
        pytest.skip("Qwen2.5-Coder-0.5B-Instruct is not fetched (scripts/fetch-models.sh qwen, or KILN_TEST_FULL=1 scripts/test.sh)")
    return openai.OpenAI(base_url=QWEN_BASE_URL, api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def http():
    with httpx.Client(base_url=root(BASE_URL), timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def auth_base_url():
    if not AUTH_BASE_URL:
        pytest.fail("KILN_AUTH_BASE_URL is not set: run the suite through tests/python/run.sh")
    return AUTH_BASE_URL


def metric(http_client, name):
    """One unlabeled-by-route sample of a `kiln:` metric from /metrics."""
    text = http_client.get("/metrics").text
    m = re.search(r"^" + re.escape(name) + r"(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics:\n{text[:2000]}"
    return float(m.group(1))


def wait_blocks_free(http_client, timeout=10.0):
    """Polls /metrics until no KV block is in use; returns the seconds it took."""
    start = time.monotonic()
    while True:
        used = metric(http_client, "kiln:kv_blocks_used")
        if used == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"kiln:kv_blocks_used still {used} after {timeout}s")
        time.sleep(0.05)


def chat(client, content, **kw):
    """A greedy chat request with few tokens unless told otherwise."""
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)
