"""`client.completions.create` (legacy completions) and `client.models`."""

import openai
import pytest

from conftest import MODEL

PROMPT = "The capital of France is"


def complete(client, prompt, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 8)
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def test_string(client):
    r = complete(client, PROMPT)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert r.system_fingerprint


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_list_of_strings(client):
    prompts = [PROMPT, "One, two, three,"]
    r = complete(client, prompts)
    assert [c.index for c in r.choices] == [0, 1]
    for i, p in enumerate(prompts):
        assert r.choices[i].text == complete(client, p).choices[0].text
    # n choices per prompt: index = prompt_index * n + choice.
    r = complete(client, prompts, n=2, temperature=1.0, seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_token_ids(client, http):
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    by_text = complete(client, PROMPT)
    by_ids = complete(client, ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    both = complete(client, [ids, ids])
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2


def test_echo(client, http):
    plain = complete(client, PROMPT).choices[0].text
    r = complete(client, PROMPT, echo=True)
    assert r.choices[0].text == PROMPT + plain
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert complete(client, ids, echo=True).choices[0].text == PROMPT + plain
    streamed = "".join(c.choices[0].text for c in complete(client, PROMPT, echo=True, stream=True) if c.choices)
    assert streamed == PROMPT + plain


def test_stream(client):
    plain = complete(client, [PROMPT, "Once upon a time"])
    chunks = list(complete(client, [PROMPT, "Once upon a time"], stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    for i in range(2):
        mine = [ch for c in chunks[:-1] for ch in c.choices if ch.index == i]
        assert "".join(ch.text for ch in mine) == plain.choices[i].text
        reasons = [ch.finish_reason for ch in mine]
        assert reasons[-1] == plain.choices[i].finish_reason and all(r is None for r in reasons[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_logprobs(client):
    r = complete(client, PROMPT, logprobs=2, max_tokens=5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    for k in range(1, len(lp.tokens)):
        assert lp.text_offset[k] == lp.text_offset[k - 1] + len(lp.tokens[k - 1].encode("utf-8"))


def test_suffix_rejected(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, PROMPT, suffix="and that is all.")
    assert e.value.param == "suffix"


def test_models(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == MODEL and len(ids) == len(set(ids))  # the chat model first; an embedder may follow
    m = models.data[0]
    assert m.object == "model" and m.owned_by and m.created > 0
    got = client.models.retrieve(MODEL)
    assert got.id == MODEL and got.created == m.created
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
