"""The Responses API (issue 11) through the official `openai` SDK, unchanged: `responses.create`
(plain text, `instructions`, `text.format` json_schema, function tools -> `function_call` items,
`function_call_output` continued with `previous_response_id`), `responses.stream` (event order,
sequence numbers, the helper's accumulated final response), `responses.parse`, retrieve /
delete / input_items, 404s and 400s naming the field, and K/V reuse along a chain
(`usage.input_tokens_details.cached_tokens`).

Text and storage tests run on the default SmolLM2 server; tool tests need Qwen2.5-Coder-0.5B
(skipped without it, like test_tools.py).
"""

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from conftest import BASE_URL, MODEL, QWEN_MODEL, metric, root, wait_blocks_free

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris", "maxLength": 40}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


# (client, id) of every stored response the module creates: deleted at its end, which must give
# every parked session's K/V blocks back (test_zz_after_all and the Qwen check in test_tools.py
# then find no block in use).
STORED = []


def keep(client, r):
    STORED.append((client, r.id))
    return r


@pytest.fixture(scope="module", autouse=True)
def delete_stored_responses_at_the_end():
    yield
    for c, rid in STORED:
        try:
            c.responses.delete(rid)
        except openai.NotFoundError:
            pass  # deleted by the test itself
    for c in {c for c, _ in STORED}:
        with httpx.Client(base_url=root(str(c.base_url).rstrip("/")), timeout=30) as h:
            wait_blocks_free(h, timeout=10)


def message_text(resp):
    """The text of the response's message items (not the SDK's `output_text` convenience)."""
    return "".join(c.text for o in resp.output if o.type == "message" for c in o.content if c.type == "output_text")


def calls(resp):
    return [o for o in resp.output if o.type == "function_call"]


def test_plain_text(client):
    r = keep(client, client.responses.create(model=MODEL, input="Name a color.", temperature=0, max_output_tokens=16))
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].id.startswith("msg_") and r.output[0].role == "assistant"
    assert message_text(r) == r.output_text and r.output_text
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 16 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens >= 0
    assert r.error is None and r.store is True and r.tool_choice == "auto" and r.tools == []


def test_instructions_are_the_system_turn(client, http):
    instr = "Answer in French, in three words."
    told = keep(client, client.responses.create(model=MODEL, input="Hi.", instructions=instr, temperature=0, max_output_tokens=4))
    assert told.instructions == instr
    # The prompt is exactly chat's rendering of [system: instructions, user: input].
    msgs = [{"role": "system", "content": instr}, {"role": "user", "content": "Hi."}]
    assert told.usage.input_tokens == http.post("/tokenize", json={"model": MODEL, "messages": msgs}).json()["count"]


def test_max_output_tokens_is_incomplete(client):
    r = keep(client, client.responses.create(model=MODEL, input="Write a long story about a kiln.", temperature=0, max_output_tokens=3))
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.max_output_tokens == 3


def test_json_schema_format(client):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = keep(client, client.responses.create(
        model=MODEL, input="Invent a person: a name and an age.", text={"format": fmt}, temperature=0, max_output_tokens=60
    ))
    jsonschema.validate(json.loads(message_text(r)), PERSON)
    assert r.text.format.type == "json_schema"


def test_parse_with_pydantic(client):
    class Person(BaseModel):
        name: str
        age: int

    r = keep(client, client.responses.parse(
        model=MODEL, input="Invent a person: a name and an age.", text_format=Person, temperature=0, max_output_tokens=60
    ))
    assert isinstance(r.output_parsed, Person)


def test_stream_events_in_order(client):
    with client.responses.stream(model=MODEL, input="Count to five.", temperature=0, max_output_tokens=200) as s:
        events = list(s)
        final = keep(client, s.get_final_response())
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == message_text(final) and deltas
    # Stored, and the same as what the stream ended with.
    got = client.responses.retrieve(final.id)
    assert message_text(got) == deltas and got.usage.output_tokens == final.usage.output_tokens
    # Greedy: the non-streamed answer is the same text.
    same = keep(client, client.responses.create(model=MODEL, input="Count to five.", temperature=0, max_output_tokens=200))
    assert message_text(same) == deltas


def test_stream_cut_by_max_output_tokens_ends_incomplete(client):
    # OpenAI's event for it; the SDK's `responses.stream` helper finalizes only on
    # `response.completed`, so read the raw events.
    events = list(client.responses.create(model=MODEL, input="Tell a long story.", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"
    r = keep(client, events[-1].response)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3


def test_raw_sse_has_event_names_and_no_top_level_error(client):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{root(BASE_URL)}/v1/responses", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    names = [ln[len("event: ") :] for ln in lines if ln.startswith("event: ")]
    datas = [json.loads(ln[len("data: ") :]) for ln in lines if ln.startswith("data: ")]
    keep(client, openai.types.responses.Response.model_validate(datas[-1]["response"]))
    assert names == [d["type"] for d in datas]
    assert all("error" not in d for d in datas)


def raw_turn(base_url, body):
    """The raw JSON response and the raw SSE events of the same request."""
    url = f"{root(base_url)}/v1/responses"
    plain = httpx.post(url, json=body, timeout=300).json()
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as r:
        events = [json.loads(ln[len("data: ") :]) for ln in r.iter_lines() if ln.startswith("data: ")]
    return plain, events


def validate_strictly(plain, events):
    """Every required field of the SDK's own types is there (its normal parsing is lenient)."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    Response.model_validate(plain)
    adapter = TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e)


def test_objects_validate_against_the_sdk_types(client):
    plain, events = raw_turn(BASE_URL, {"model": MODEL, "input": "Hi", "max_output_tokens": 6, "temperature": 0})
    validate_strictly(plain, events)
    items = httpx.get(f"{root(BASE_URL)}/v1/responses/{plain['id']}/input_items", timeout=30).json()
    openai.types.responses.ResponseItemList.model_validate(items)
    for r in (plain, events[-1]["response"]):
        keep(client, openai.types.responses.Response.model_validate(r))


def test_tool_objects_validate_against_the_sdk_types(qwen_client):
    from conftest import QWEN_BASE_URL

    # Bounded: under `required` with parallel calls allowed, Qwen2.5-0.5B sometimes chains calls,
    # and unbounded that can run to its 32k context (once > 300 s on this CPU). The test is
    # about the objects' types, not about how many calls the model makes.
    body = {"model": QWEN_MODEL, "input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
            "max_output_tokens": 256}
    plain, events = raw_turn(QWEN_BASE_URL, body)
    validate_strictly(plain, events)
    assert plain["output"][0]["type"] == "function_call"
    for r in (plain, events[-1]["response"]):
        keep(qwen_client, openai.types.responses.Response.model_validate(r))
    out = {"type": "function_call_output", "call_id": plain["output"][0]["call_id"], "output": "Sunny"}
    body = {"model": QWEN_MODEL, "input": [out], "previous_response_id": plain["id"], "max_output_tokens": 8}
    nxt = httpx.post(f"{root(QWEN_BASE_URL)}/v1/responses", json=body, timeout=300).json()
    keep(qwen_client, openai.types.responses.Response.model_validate(nxt))
    items = httpx.get(f"{root(QWEN_BASE_URL)}/v1/responses/{nxt['id']}/input_items", timeout=30).json()
    openai.types.responses.ResponseItemList.model_validate(items)
    assert items["data"][0]["type"] == "function_call_output"


def test_retrieve_input_items_delete(client):
    r = keep(client, client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        ],
        max_output_tokens=4,
        metadata={"k": "v"},
    ))
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.metadata == {"k": "v"} and got.output[0].id == r.output[0].id
    items = client.responses.input_items.list(r.id)
    assert [i.role for i in items.data] == ["user", "developer"]  # newest first, as OpenAI
    assert items.first_id == items.data[0].id and items.last_id == items.data[-1].id and not items.has_more
    asc = client.responses.input_items.list(r.id, order="asc", limit=1)
    assert [i.role for i in asc.data] == ["developer"] and asc.has_more
    assert client.responses.delete(r.id) is None  # the SDK returns nothing on success
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.input_items.list(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_store_false_and_unknown_ids(client):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope", max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")


def test_chain_remembers(client):
    first = keep(client, client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8, temperature=0))
    second = keep(client, client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=8, temperature=0
    ))
    assert second.previous_response_id == first.id
    # The new turn's prompt holds the whole first turn, and its K/V was reused.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert [i.type for i in client.responses.input_items.list(second.id).data] == ["message"]


def test_chain_with_new_instructions_is_rendered_anew(client, http):
    """`instructions` are not carried along a chain: a turn with other instructions than the
    previous one cannot append to its session (whose history holds the old ones); its prompt is
    exactly the whole conversation rendered with the new instructions."""
    first = keep(client, client.responses.create(model=MODEL, input="My name is Ada.", instructions="Be brief.", max_output_tokens=8, temperature=0))
    new = "You are a kind assistant who answers in French."
    second = keep(client, client.responses.create(
        model=MODEL, input="What is my name?", instructions=new, previous_response_id=first.id, max_output_tokens=4, temperature=0
    ))
    msgs = [
        {"role": "system", "content": new},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": message_text(first)},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.usage.input_tokens == http.post("/tokenize", json={"model": MODEL, "messages": msgs}).json()["count"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "schema": PERSON}}}, "text.format.name"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input[0].call_id"),
        ({"input": 3}, "input"),
        ({"text": 3}, "text"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"background": True, "stream": True}, "stream"),
        ({"background": True, "store": False}, "store"),
    ],
)
def test_bad_requests_name_the_field(client, extra, param):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**body)
    assert e.value.body["param"] == param, e.value.body


def test_background_runs_and_cancels(client, http):
    import time

    r = keep(client, client.responses.create(model=MODEL, input="Hi", background=True, max_output_tokens=8))
    assert r.status == "queued" and r.background is True and not r.output
    deadline = time.monotonic() + 60
    while (got := client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got.status in ("completed", "incomplete") and message_text(got)
    assert client.responses.cancel(r.id).status == got.status  # finished: returned as it is
    # A long one cancelled while it runs: its generation stops and the record says so.
    long = keep(client, client.responses.create(model=MODEL, input="Write a long story.", background=True, max_output_tokens=4000))
    time.sleep(0.2)
    assert client.responses.cancel(long.id).status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    deadline = time.monotonic() + 10
    while metric(http, "kiln:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the cancelled generation still runs"
        time.sleep(0.05)


def test_bad_query_parameters_name_themselves(client):
    r = keep(client, client.responses.create(model=MODEL, input="Hi", max_output_tokens=2))
    for query, param in [("limit=abc", "limit"), ("limit=0", "limit"), ("order=up", "order"), ("after=nope", "after")]:
        got = httpx.get(f"{root(BASE_URL)}/v1/responses/{r.id}/input_items?{query}", timeout=30)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text


def test_cancel_a_finished_response_is_a_400(client):
    r = keep(client, client.responses.create(model=MODEL, input="Hi", max_output_tokens=2))
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(r.id)


# --- tools (Qwen2.5-Coder-0.5B) ---


def test_function_call_then_output(qwen_client):
    c = qwen_client
    r = keep(c, c.responses.create(model=QWEN_MODEL, input="What is the weather in Paris?", tools=[WEATHER], temperature=0))
    assert r.status == "completed"
    (call,) = calls(r)
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.name == "get_weather"
    assert call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    out = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp_c": 21, "sky": "sunny"})}
    # Qwen2.5-Coder-0.5B re-calls tools after nearly every result; `none` asks for the answer.
    final = keep(c, c.responses.create(
        model=QWEN_MODEL, previous_response_id=r.id, input=[out], tools=[WEATHER], tool_choice="none", temperature=0
    ))
    assert final.status == "completed" and not calls(final) and message_text(final).strip()
    # An output for a call that is not open (already answered) is a 400 naming the item.
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=QWEN_MODEL, previous_response_id=final.id, input=[out], tools=[WEATHER])
    assert e.value.body["param"] == "input[0].call_id"


def test_chain_reuses_the_turns_kv(qwen_client):
    c = qwen_client
    r = keep(c, c.responses.create(model=QWEN_MODEL, input="What is the weather in Oslo?", tools=[WEATHER], temperature=0))
    (call,) = calls(r)
    out = {"type": "function_call_output", "call_id": call.call_id, "output": "{\"temp_c\": 3}"}
    nxt = keep(c, c.responses.create(model=QWEN_MODEL, previous_response_id=r.id, input=[out], tools=[WEATHER], temperature=0))
    # The parked session holds the first prompt and the call exactly as generated: all of it
    # is reused except the last sampled token, whose K/V was never computed.
    assert nxt.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens + r.usage.output_tokens - 2


def test_stream_function_call_events(qwen_client):
    with qwen_client.responses.stream(
        model=QWEN_MODEL, input="What is the weather in Rome?", tools=[WEATHER], tool_choice="required", temperature=0
    ) as s:
        events = list(s)
        final = keep(qwen_client, s.get_final_response())
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (call,) = calls(final)
    assert events[2].item.type == "function_call" and events[2].item.call_id == call.call_id
    assert events[4].arguments == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_tools_with_text_format(qwen_client):
    """Tools and a json_schema answer in one request (what the Agents SDK sends for an
    `output_type`): the output is a call or a schema-valid answer, never free text."""
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    for prompt in ("What is the weather in Paris?", "Invent a person: a name and an age."):
        r = keep(qwen_client, qwen_client.responses.create(
            model=QWEN_MODEL, input=prompt, tools=[WEATHER], text={"format": fmt}, temperature=0, max_output_tokens=80
        ))
        if calls(r):
            jsonschema.validate(json.loads(calls(r)[0].arguments), WEATHER["parameters"])
        else:
            jsonschema.validate(json.loads(message_text(r)), PERSON)
    r = keep(qwen_client, qwen_client.responses.create(
        model=QWEN_MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="none",
        text={"format": fmt},
        temperature=0,
        max_output_tokens=80,
    ))
    assert not calls(r)
    jsonschema.validate(json.loads(message_text(r)), PERSON)
