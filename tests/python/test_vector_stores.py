"""Files, vector stores and the `file_search` tool (issue 12, retrieval) through the official
`openai` SDK, unchanged: `files.create` / `retrieve` / `content` / `delete`,
`vector_stores.create`, `vector_stores.files.upload_and_poll` (upload + attach + poll to
`completed`), `vector_stores.search` (the file holding a made-up fact comes first; attribute
filters narrow the results), a binary file refused with a 400, and `responses.create` with a
`file_search` tool: kiln runs the search itself and returns a `file_search_call` (with the right
file in its included results) followed by the model's message.

Storage and search run on the default server (it serves all-MiniLM-L6-v2); the `file_search`
turn needs Qwen2.5-Coder-0.5B (skipped without it, like the other tool tests).
"""

import io

import openai
import pytest

from conftest import QWEN_MODEL

HERON = (
    "# Project Heron\n\nThe launch code for Project Heron is 7749-QX. It was chosen by the quartermaster "
    "in the spring and is kept in the blue binder."
)
GARDEN = "# Garden notes\n\nTomatoes need full sun and deep watering twice a week. Basil grows well beside them."
TRAINS = "# Rail timetable\n\nThe night train to Vienna leaves platform 4 at 22:15 and arrives at 07:40."


def store_with_files(client, name):
    """A vector store holding the three notes; returns it and {filename: file id}."""
    vs = client.vector_stores.create(name=name)
    ids = {}
    for filename, text, team in [("heron.md", HERON, "ops"), ("garden.md", GARDEN, "home"), ("trains.txt", TRAINS, "ops")]:
        f = client.vector_stores.files.upload_and_poll(
            vector_store_id=vs.id, file=(filename, io.BytesIO(text.encode())), attributes={"team": team}
        )
        assert f.status == "completed" and f.last_error is None, f
        ids[filename] = f.id
    return vs, ids


def test_files_round_trip(client):
    f = client.files.create(file=("notes.txt", io.BytesIO(b"hello files")), purpose="assistants")
    assert f.object == "file" and f.bytes == 11 and f.filename == "notes.txt" and f.purpose == "assistants"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).read() == b"hello files"
    assert f.id in [x.id for x in client.files.list(limit=100)]
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_upload_and_poll_then_search(client):
    vs, ids = store_with_files(client, "notes")
    vs = client.vector_stores.retrieve(vs.id)
    assert vs.file_counts.completed == 3 and vs.file_counts.total == 3 and vs.status == "completed"
    page = client.vector_stores.search(vs.id, query="What is the launch code for Project Heron?", max_num_results=3)
    top = page.data[0]
    assert top.file_id == ids["heron.md"] and top.filename == "heron.md", page
    assert "7749-QX" in top.content[0].text and top.content[0].type == "text"
    assert top.attributes == {"team": "ops"}
    home = client.vector_stores.search(
        vs.id, query="launch code", filters={"type": "eq", "key": "team", "value": "home"}
    )
    assert home.data and all(r.file_id == ids["garden.md"] for r in home.data)
    listed = client.vector_stores.files.list(vs.id)
    assert sorted(f.id for f in listed.data) == sorted(ids.values())
    client.vector_stores.files.delete(file_id=ids["heron.md"], vector_store_id=vs.id)
    after = client.vector_stores.search(vs.id, query="launch code for Project Heron", max_num_results=10)
    assert all(r.file_id != ids["heron.md"] for r in after.data)
    assert client.vector_stores.delete(vs.id).deleted


def test_binary_file_is_refused(client):
    vs = client.vector_stores.create(name="binary")
    png = client.files.create(file=("logo.png", io.BytesIO(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")), purpose="assistants")
    with pytest.raises(openai.BadRequestError) as e:
        client.vector_stores.files.create(vector_store_id=vs.id, file_id=png.id)
    assert "UTF-8 text" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=vs.id, file_id="file-nope")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve("vs_nope")
    client.vector_stores.delete(vs.id)


def test_responses_file_search(qwen_client):
    vs, ids = store_with_files(qwen_client, "kb")
    r = qwen_client.responses.create(
        model=QWEN_MODEL,
        input="What is the launch code for Project Heron?",
        tools=[{"type": "file_search", "vector_store_ids": [vs.id], "max_num_results": 2}],
        tool_choice="required",
        include=["file_search_call.results"],
        temperature=0,
        max_output_tokens=80,
    )
    assert r.status == "completed", r
    calls = [i for i in r.output if i.type == "file_search_call"]
    assert calls and calls[0].status == "completed" and calls[0].queries, r.output
    assert calls[0].results and calls[0].results[0].file_id == ids["heron.md"], calls[0]
    assert r.output[-1].type == "message" and r.output_text, r.output


def test_file_batch_create_and_poll(client):
    vs = client.vector_stores.create(name="batch")
    ok = [client.files.create(file=(f"{i}.txt", io.BytesIO(t.encode())), purpose="assistants") for i, t in enumerate([GARDEN, TRAINS])]
    png = client.files.create(file=("x.png", io.BytesIO(b"\x89PNG\x00\xff")), purpose="assistants")
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id, file_ids=[f.id for f in ok] + [png.id]
    )
    assert batch.object == "vector_store.files_batch" and batch.status == "completed", batch
    assert batch.file_counts.completed == 2 and batch.file_counts.failed == 1 and batch.file_counts.total == 3
    assert client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id).id == batch.id
    page = client.vector_stores.search(vs.id, query="night train to Vienna")
    assert page.data[0].file_id == ok[1].id
    client.vector_stores.delete(vs.id)
