"""`client.chat.completions.create` through the official SDK: plain, streamed, usage, n, seed,
stop strings, logprobs, max_completion_tokens, and the `.stream()` helper."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import MODEL, chat

PROMPT = "Name three rivers."


def test_plain(client):
    r = chat(client, PROMPT, max_tokens=12)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    assert len(r.choices) == 1
    ch = r.choices[0]
    assert ch.index == 0
    assert ch.message.role == "assistant"
    assert isinstance(ch.message.content, str) and ch.message.content
    assert ch.finish_reason in ("stop", "length")
    assert ch.logprobs is None
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens >= 0
    assert r.system_fingerprint and r.system_fingerprint == chat(client, "Hi", max_tokens=1).system_fingerprint


def test_request_id_echoed_and_generated(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_headers={"x-request-id": "kiln-test-42"}
    )
    assert raw.headers["x-request-id"] == "kiln-test-42"
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert raw.headers.get("x-request-id")
    assert raw.parse().choices[0].message.content is not None


def check_stream_chunks(chunks, n, include_usage=False):
    """OpenAI's streaming contract; returns the text per choice."""
    assert chunks, "no chunks"
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and chunks[0].id.startswith("chatcmpl-")
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1, "exactly one chunk carries usage"
        assert usage_chunks[0] is chunks[-1], "the usage chunk is the last one"
        assert chunks[-1].choices == []
        body = chunks[:-1]
    else:
        assert usage_chunks == []
        body = chunks
    for c in body:
        assert c.object == "chat.completion.chunk"
        assert len(c.choices) >= 1, "only the usage chunk may have no choices"
    texts = {}
    for i in range(n):
        mine = [ch for c in body for ch in c.choices if ch.index == i]
        assert mine, f"no chunk for choice {i}"
        roles = [ch.delta.role for ch in mine]
        assert roles[0] == "assistant", "the first delta of a choice carries the role"
        assert all(r is None for r in roles[1:]), f"role only in the first delta: {roles}"
        reasons = [ch.finish_reason for ch in mine]
        assert reasons[-1] in ("stop", "length"), reasons
        assert all(r is None for r in reasons[:-1]), f"finish_reason null until the last chunk: {reasons}"
        texts[i] = "".join(ch.delta.content or "" for ch in mine)
    assert {ch.index for c in body for ch in c.choices} == set(range(n))
    return texts


def test_stream(client):
    chunks = list(chat(client, PROMPT, max_tokens=12, stream=True))
    texts = check_stream_chunks(chunks, 1)
    assert texts[0] == chat(client, PROMPT, max_tokens=12).choices[0].message.content


def test_stream_raw_sse(http):
    """The wire format: `data: {json}` events, keep-alives only as comments, `data: [DONE]` last."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l != ""]
    data = [l for l in lines if not l.startswith(":")]
    assert all(l.startswith("data: ") for l in data), data
    assert data[-1] == "data: [DONE]"
    for l in data[:-1]:
        obj = json.loads(l[len("data: "):])
        assert "error" not in obj, obj
        assert "usage" not in obj or obj["usage"] is None


def test_stream_include_usage(client):
    chunks = list(chat(client, PROMPT, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    texts = check_stream_chunks(chunks, 1, include_usage=True)
    u = chunks[-1].usage
    plain = chat(client, PROMPT, max_tokens=10)
    assert texts[0] == plain.choices[0].message.content
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
        plain.usage.total_tokens,
    )


def test_n2(client):
    r = chat(client, "Write a short poem about the sea.", n=2, temperature=1.0, seed=11, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 24
    assert r.choices[0].message.content != r.choices[1].message.content, "n choices must be independent samples"
    # Streamed n=2 gives the same texts and keeps the per-choice contract.
    chunks = list(chat(client, "Write a short poem about the sea.", n=2, temperature=1.0, seed=11, max_tokens=12,
                       stream=True, stream_options={"include_usage": True}))
    texts = check_stream_chunks(chunks, 2, include_usage=True)
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_seed_reproducible(client):
    kw = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    a = chat(client, "Tell me a story.", **kw).choices[0].message.content
    b = chat(client, "Tell me a story.", **kw).choices[0].message.content
    assert a == b
    others = {chat(client, "Tell me a story.", **{**kw, "seed": s}).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should give different samples"


def test_seed_reproducible_with_traffic(client):
    kw = dict(temperature=1.0, seed=99, max_tokens=24)
    alone = chat(client, "Describe a cat.", **kw).choices[0].message.content

    def noise(i):
        return chat(client, f"Count to {i + 3}.", temperature=0.8, max_tokens=20 + i).choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(noise, i) for i in range(5)]
        busy = pool.submit(lambda: chat(client, "Describe a cat.", **kw).choices[0].message.content)
        [f.result() for f in futs]
        assert busy.result() == alone


def test_stop_strings(client):
    base = chat(client, PROMPT, max_tokens=24, extra_body={"ignore_eos": True})
    text = base.choices[0].message.content
    words = [w for w in text.split() if len(w) >= 3]
    assert len(words) >= 3, text
    stop = words[2]
    cut = text[: text.index(stop)]
    for form in (stop, [stop, "zzzz-never"]):
        r = chat(client, PROMPT, max_tokens=24, stop=form)
        out = r.choices[0].message.content
        assert stop not in out
        assert out == cut
        assert r.choices[0].finish_reason == "stop"
    streamed = list(chat(client, PROMPT, max_tokens=24, stop=[stop], stream=True))
    s_text = check_stream_chunks(streamed, 1)[0]
    assert s_text == cut and stop not in s_text
    assert streamed[-1].choices[0].finish_reason == "stop"


def check_bytes(t):
    """`bytes` are the token's UTF-8 bytes (a token may hold part of a character)."""
    assert isinstance(t.bytes, list) and t.bytes and all(isinstance(b, int) and 0 <= b < 256 for b in t.bytes)
    try:
        assert bytes(t.bytes).decode("utf-8") == t.token
    except UnicodeDecodeError:
        pass


def test_logprobs(client):
    r = chat(client, PROMPT, max_tokens=8, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == r.usage.completion_tokens
    assert "".join(t.token for t in lp.content) == r.choices[0].message.content
    for t in lp.content:
        assert t.logprob <= 0
        check_bytes(t)
        assert len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5
        for x in t.top_logprobs:
            assert x.logprob <= 0
            check_bytes(x)
    # logprobs without top_logprobs: empty alternatives.
    r0 = chat(client, PROMPT, max_tokens=4, logprobs=True)
    assert all(t.top_logprobs == [] for t in r0.choices[0].logprobs.content)
    # Streamed logprobs add up to the same list.
    chunks = list(chat(client, PROMPT, max_tokens=8, logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content for t in ch.logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in lp.content]
    # The maximum, 20, is accepted.
    r20 = chat(client, PROMPT, max_tokens=2, logprobs=True, top_logprobs=20)
    assert all(len(t.top_logprobs) == 20 for t in r20.choices[0].logprobs.content)


def test_max_completion_tokens_wins(client):
    r = chat(client, PROMPT, max_tokens=20, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = chat(client, PROMPT, max_tokens=3, max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5


def test_extra_fields_accepted(client):
    r = chat(client, PROMPT, max_tokens=2, user="someone", extra_body={"some_vendor_field": {"x": 1}, "top_k": 5, "min_p": 0.05})
    assert r.choices[0].message.content is not None
    r = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ])
    assert r.choices[0].message.content is not None


def test_stream_helper(client):
    """`client.chat.completions.stream()` accumulates to the same text as its delta events. (The
    helper raises LengthFinishReasonError on finish_reason "length", so a stop string ends it.)"""
    words = chat(client, PROMPT, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content.split()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0, stop=[words[3]])
    deltas, done = [], None
    with client.chat.completions.stream(**kw, logprobs=True) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
            elif event.type == "content.done":
                done = event.content
        final = stream.get_final_completion()
    text = "".join(deltas)
    assert text and text == done == final.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"
    assert len(final.choices[0].logprobs.content) >= 1
    plain = client.chat.completions.create(**kw)
    assert text == plain.choices[0].message.content


def test_logit_bias(client, http):
    banana = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    assert len(banana) == 1
    r = chat(client, "Hi", max_tokens=4, logit_bias={str(banana[0]): 100})
    assert r.choices[0].message.content == " banana" * 4
    # -100 bans the greedy first token.
    base = chat(client, "Hi", max_tokens=4, logprobs=True)
    first = base.choices[0].logprobs.content[0].token
    ids = http.post("/tokenize", json={"prompt": first, "add_special_tokens": False}).json()["tokens"]
    banned = chat(client, "Hi", max_tokens=4, logprobs=True, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].logprobs.content[0].token != first


def test_top_k_1_is_greedy(client):
    greedy = chat(client, PROMPT, max_tokens=12).choices[0].message.content
    assert chat(client, PROMPT, max_tokens=12, temperature=1.0, seed=3, extra_body={"top_k": 1}).choices[0].message.content == greedy
