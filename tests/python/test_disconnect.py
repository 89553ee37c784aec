"""A client that goes away, streaming or not, aborts its sequence: the engine frees its KV blocks
at once (within a step), long before the request could have finished (ignore_eos makes it run to
max_tokens: thousands of tokens, many seconds on this model).

The engine's own gauges are the evidence (kv_blocks_used, num_requests_running): the HTTP-side
token counter stops with the client whether or not the engine goes on."""

import httpx

from conftest import MODEL, metric, root, wait_blocks_free, BASE_URL

LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about the history of bridges."}],
    "max_tokens": 4000,
    "ignore_eos": True,
}


def assert_aborted(http):
    wait_blocks_free(http, timeout=3)
    assert metric(http, "kiln:num_requests_running") == 0
    assert metric(http, "kiln:num_requests_waiting") == 0


def test_streaming_disconnect_frees_blocks(http, client):
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
    assert_aborted(http)


def test_sdk_stream_close_frees_blocks(http, client):
    stream = client.chat.completions.create(model=MODEL, messages=LONG["messages"], max_tokens=4000, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    stream.close()
    assert_aborted(http)


def test_non_streaming_disconnect_frees_blocks(http):
    try:
        with httpx.Client(base_url=root(BASE_URL), timeout=1.0) as c:
            c.post("/v1/chat/completions", json=LONG)
        raise AssertionError("a 4000-token request should not finish within the 1 s client timeout")
    except httpx.TimeoutException:
        pass
    assert_aborted(http)


def test_n2_completions_disconnect_frees_blocks(http):
    body = {"model": MODEL, "prompt": ["Once upon a time", "In a galaxy"], "n": 2, "max_tokens": 4000, "ignore_eos": True,
            "stream": True, "temperature": 1.0}
    with httpx.Client(base_url=root(BASE_URL), timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i >= 12:
                    break
    assert_aborted(http)
