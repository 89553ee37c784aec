"""API keys (second server, started with --api-key): every route but /health needs one."""

import httpx
import openai
import pytest

from conftest import API_KEY, MODEL, root


@pytest.fixture(scope="module")
def auth_http(auth_base_url):
    with httpx.Client(base_url=root(auth_base_url), timeout=60) as c:
        yield c


def test_right_key_works(auth_base_url):
    c = openai.OpenAI(base_url=auth_base_url, api_key=API_KEY, max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_wrong_key_is_authentication_error(auth_base_url):
    c = openai.OpenAI(base_url=auth_base_url, api_key="wrong-" + API_KEY, max_retries=0)
    for call in (
        lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2),
        lambda: c.completions.create(model=MODEL, prompt="Hi", max_tokens=2),
        lambda: c.models.list(),
    ):
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        e = info.value
        assert e.status_code == 401 and e.type == "authentication_error" and e.code == "invalid_api_key"
        assert "param" in e.body


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"),
     ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models/" + MODEL)],
)
def test_missing_or_wrong_key(auth_http, method, path):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        r = auth_http.request(method, path, headers=headers, json={"prompt": "hi"} if method == "POST" else None)
        assert r.status_code == 401, (method, path, headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers.get("x-request-id")


def test_keyed_routes_with_key(auth_http):
    h = {"Authorization": f"Bearer {API_KEY}"}
    assert auth_http.get("/metrics", headers=h).status_code == 200
    r = auth_http.post("/tokenize", headers=h, json={"prompt": "hello world"})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"])


def test_health_is_open(auth_http):
    r = auth_http.get("/health")
    assert r.status_code == 200
