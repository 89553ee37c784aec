"""/v1/embeddings through the official SDK: the default base64 encoding and float agree,
`dimensions` is refused for a model not trained to be cut (Matryoshka), token ids are used as
given, vectors match sentence-transformers' reference, and bad inputs raise the right SDK error
classes."""

import json
import math
import os
import pathlib

import openai
import pytest

EMBED_MODEL = "all-minilm-l6-v2"
REFERENCE = pathlib.Path(os.environ.get("KILN_REFERENCE_DIR", pathlib.Path(__file__).resolve().parents[1] / "reference")) / "all-minilm-l6-v2.json"


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def test_listed_in_models(client):
    ids = [m.id for m in client.models.list().data]
    assert EMBED_MODEL in ids


def test_base64_default_equals_float(client):
    texts = ["The quick brown fox", "jumps over the lazy dog", ""]
    b64 = client.embeddings.create(model=EMBED_MODEL, input=texts)  # the SDK asks for base64
    flt = client.embeddings.create(model=EMBED_MODEL, input=texts, encoding_format="float")
    assert [d.index for d in b64.data] == [0, 1, 2]
    for a, b in zip(b64.data, flt.data):
        assert len(a.embedding) == 384
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) == 0.0
        assert abs(norm(a.embedding) - 1.0) < 1e-4
    assert flt.usage.prompt_tokens == flt.usage.total_tokens > 0


def test_matches_sentence_transformers_reference(client):
    items = json.loads(REFERENCE.read_text())["items"][:8]
    r = client.embeddings.create(model=EMBED_MODEL, input=[it["text"] for it in items], encoding_format="float")
    for it, d in zip(items, r.data):
        assert cosine(it["embedding"], d.embedding) >= 0.9999, it["text"]


def test_dimensions_refused_for_a_model_not_trained_for_it(client):
    # MiniLM's config.json declares no Matryoshka training: a cut vector would silently lose
    # quality, so (as vLLM does) only its full size is accepted.
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED_MODEL, input="kilns fire clay", dimensions=128)
    assert e.value.body["param"] == "dimensions" and "Matryoshka" in e.value.body["message"]
    full = client.embeddings.create(model=EMBED_MODEL, input="kilns fire clay", dimensions=384).data[0].embedding
    assert len(full) == 384 and abs(norm(full) - 1.0) < 1e-4


def test_token_id_inputs_are_used_as_given(client):
    # [CLS] hello world [SEP]: the ids text input gets; nothing is added to token-id input.
    r = client.embeddings.create(model=EMBED_MODEL, input=[[101, 7592, 2088, 102]], encoding_format="float")
    text = client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="float")
    assert cosine(r.data[0].embedding, text.data[0].embedding) > 0.99999
    assert r.usage.prompt_tokens == text.usage.prompt_tokens == 4
    # Issue 14's reproducer: [[101, 7592, 102]] is 3 tokens, not 5.
    assert client.embeddings.create(model=EMBED_MODEL, input=[[101, 7592, 102]]).usage.prompt_tokens == 3


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": 385}, "dimensions"),
        ({"input": []}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_inputs_are_bad_requests(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED_MODEL, **kwargs)
    assert e.value.status_code == 400
    assert e.value.param == param


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="no-such-embedder", input="x")
    assert e.value.code == "model_not_found"


def test_chat_model_does_not_embed(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model, input="x")
    assert e.value.param == "model"
