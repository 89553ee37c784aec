"""A client that goes away, streaming or not, aborts its sequence: the KV blocks are freed and
generation stops long before max_tokens (ignore_eos makes the request run to max_tokens)."""

import time

import httpx

from conftest import MODEL, metric, root, wait_blocks_free, BASE_URL

LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about the history of bridges."}],
    "max_tokens": 2000,
    "ignore_eos": True,
}


def assert_stopped(http, generated_before):
    """Blocks free quickly, and the token counter no longer moves."""
    wait_blocks_free(http, timeout=10)
    assert metric(http, "kiln:num_requests_running") == 0
    after = metric(http, "kiln:generation_tokens_total")
    time.sleep(0.5)
    assert metric(http, "kiln:generation_tokens_total") == after, "generation continued after the client left"
    assert after - generated_before < 1500, "the request ran (almost) to max_tokens despite the disconnect"


def test_streaming_disconnect_frees_blocks(http, client):
    before = metric(http, "kiln:generation_tokens_total")
    with httpx.Client(base_url=root(BASE_URL), timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 5:
                    break
            assert metric(http, "kiln:kv_blocks_used") > 0, "the request should hold blocks while it runs"
    assert_stopped(http, before)


def test_sdk_stream_close_frees_blocks(http, client):
    before = metric(http, "kiln:generation_tokens_total")
    stream = client.chat.completions.create(model=MODEL, messages=LONG["messages"], max_tokens=2000, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    stream.close()
    assert_stopped(http, before)


def test_non_streaming_disconnect_frees_blocks(http):
    before = metric(http, "kiln:generation_tokens_total")
    try:
        with httpx.Client(base_url=root(BASE_URL), timeout=1.0) as c:
            c.post("/v1/chat/completions", json=LONG)
        raise AssertionError("a 2000-token request should not finish within the 1 s client timeout")
    except httpx.TimeoutException:
        pass
    assert_stopped(http, before)


def test_n2_completions_disconnect_frees_blocks(http):
    before = metric(http, "kiln:generation_tokens_total")
    body = {"model": MODEL, "prompt": ["Once upon a time", "In a galaxy"], "n": 2, "max_tokens": 2000, "ignore_eos": True,
            "stream": True, "temperature": 1.0}
    with httpx.Client(base_url=root(BASE_URL), timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i >= 12:
                    break
    assert_stopped(http, before)
