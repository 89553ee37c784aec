"""Errors as the SDK sees them: the right exception class, with status_code, type, param and code
populated from OpenAI's `{"error": {...}}` body."""

import httpx
import openai
import pytest

from conftest import MODEL, chat, root, BASE_URL


def raises(cls, fn, **kw):
    with pytest.raises(cls) as info:
        fn(**kw)
    e = info.value
    assert isinstance(e.body, dict), e.body
    assert set(e.body) >= {"message", "type", "param", "code"}, e.body
    assert e.type == e.body["type"] and e.message
    return e


def test_bad_temperature(client):
    e = raises(openai.BadRequestError, chat, client=client, content="Hi", temperature=3.5)
    assert (e.status_code, e.type, e.param) == (400, "invalid_request_error", "temperature")


@pytest.mark.parametrize("field,value", [("top_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -3), ("n", 0), ("max_tokens", 0)])
def test_bad_ranges_name_the_field(client, field, value):
    e = raises(openai.BadRequestError, chat, client=client, content="Hi", **{field: value})
    assert e.status_code == 400 and e.param == field


def test_context_length_exceeded(client):
    e = raises(openai.BadRequestError, chat, client=client, content="Hi", max_tokens=1_000_000)
    assert e.status_code == 400 and e.code == "context_length_exceeded"
    e = raises(openai.BadRequestError, chat, client=client, content="hello " * 10_000, max_tokens=4)
    assert e.code == "context_length_exceeded" and e.param == "messages"
    e = raises(openai.BadRequestError, client.completions.create, model=MODEL, prompt="hello " * 10_000, max_tokens=4)
    assert e.code == "context_length_exceeded" and e.param == "prompt"


def test_top_logprobs_21(client):
    e = raises(openai.BadRequestError, chat, client=client, content="Hi", logprobs=True, top_logprobs=21)
    assert e.param == "top_logprobs"


def test_tools_with_response_format_rejected(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    e = raises(openai.BadRequestError, chat, client=client, content="Hi", tools=tools, response_format={"type": "json_object"})
    assert e.status_code == 400 and e.param == "response_format"


def test_unknown_model(client):
    e = raises(openai.NotFoundError, client.chat.completions.create, model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert (e.status_code, e.code, e.param) == (404, "model_not_found", "model")
    e = raises(openai.NotFoundError, client.completions.create, model="gpt-4o", prompt="Hi")
    assert e.code == "model_not_found"


def test_bad_messages(client):
    e = raises(openai.BadRequestError, client.chat.completions.create, model=MODEL, messages=[])
    assert e.param == "messages"
    e = raises(openai.BadRequestError, client.chat.completions.create, model=MODEL, messages=[{"role": "wizard", "content": "Hi"}])
    assert e.param.startswith("messages")


def test_stream_options_without_stream(client):
    e = raises(openai.BadRequestError, chat, client=client, content="Hi", stream_options={"include_usage": True})
    assert e.param == "stream_options"


def test_body_too_large(client):
    with pytest.raises(openai.APIStatusError) as info:
        chat(client, "x" * (9 << 20), max_tokens=1)
    e = info.value
    assert e.status_code == 413 and e.type == "invalid_request_error"


def test_unknown_route_is_json_404(http):
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/embeddingz"), ("GET", "/")):
        r = http.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["type"] and err["message"] and "param" in err and "code" in err


def test_wrong_method_is_json_405(http):
    for method, path in (("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("POST", "/health")):
        r = http.request(method, path)
        assert r.status_code == 405, (method, path)
        assert r.json()["error"]["type"] == "invalid_request_error", (method, path, r.text)


def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": "ten"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_missing_required_field_names_it(client):
    e = raises(openai.BadRequestError, client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "Hi"}],
               extra_body={"model": None})
    assert e.status_code == 400 and e.param == "model"


def test_body_must_be_one_json_value(http):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1} trailing' % MODEL.encode()
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None


def test_completions_logprobs_over_20(client):
    e = raises(openai.BadRequestError, client.completions.create, model=MODEL, prompt="Hi", max_tokens=1, logprobs=21)
    assert e.param == "logprobs"
