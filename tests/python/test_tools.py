"""Tool calls (issue 5) through the official SDK: `tools`, `tool_choice` (none | auto | required |
named), `parallel_tool_calls`, `message.tool_calls`, streamed tool-call deltas, the `.stream()`
helper, multi-turn tool conversations and the 400s.

Two servers: Qwen2.5-Coder-0.5B-Instruct (its chat template renders tools natively; the tests
skip when it is not fetched) and the default SmolLM2 (no tools in its template: kiln injects the
generic `<tool_call>` format). Arguments are checked with `jsonschema` against the tool's own
parameters, never just parsed.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL, QWEN_BASE_URL, QWEN_MODEL, root, wait_blocks_free


def fn_tool(name, description, parameters=None):
    f = {"name": name, "description": description}
    if parameters is not None:
        f["parameters"] = parameters
    return {"type": "function", "function": f}


WEATHER = fn_tool(
    "get_weather",
    "Get the current weather in a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city name, e.g. Paris", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
)
STOCK = fn_tool(
    "get_stock_price",
    "Get the latest price of a stock by its ticker symbol.",
    {
        "type": "object",
        "properties": {"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$", "description": "e.g. AAPL"}},
        "required": ["ticker"],
        "additionalProperties": False,
    },
)
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF"]
CONVERT = fn_tool(
    "convert_currency",
    "Convert an amount of money from one currency to another.",
    {
        "type": "object",
        "properties": {
            "amount": {"type": "number", "minimum": 0, "maximum": 1000000},
            "from_currency": {"type": "string", "enum": CURRENCIES},
            "to_currency": {"type": "string", "enum": CURRENCIES},
        },
        "required": ["amount", "from_currency", "to_currency"],
        "additionalProperties": False,
    },
)
EMAIL = fn_tool(
    "send_email",
    "Send an email.",
    {
        "type": "object",
        "properties": {
            "to": {"type": "string", "maxLength": 60},
            "subject": {"type": "string", "maxLength": 60},
            "body": {"type": "string", "maxLength": 200},
        },
        "required": ["to", "subject", "body"],
        "additionalProperties": False,
    },
)
NOW = fn_tool("get_current_time", "Get the current local time.")  # no parameters at all

TOOLS = [WEATHER, STOCK, CONVERT, EMAIL, NOW]
PARAMS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}, "additionalProperties": False}) for t in TOOLS}

PROMPTS = [
    "What's the weather like in Paris right now?",
    "How much is one share of Apple (AAPL) worth today?",
    "Convert 250 euros to US dollars.",
    "Is it cold in Oslo at the moment?",
    "Email bob@example.com that the meeting moved to 3pm.",
]

# (prompt, the tool it plainly needs)
AUTO_PROMPTS = [
    ("What's the weather like in Paris right now?", "get_weather"),
    ("Is it raining in London today?", "get_weather"),
    ("Check the current weather in Berlin for me.", "get_weather"),
    ("What is the temperature in Tokyo right now, in fahrenheit?", "get_weather"),
    ("What's the current stock price of Microsoft (MSFT)?", "get_stock_price"),
    ("How much is Tesla stock (TSLA) trading at right now?", "get_stock_price"),
    ("Convert 100 US dollars to euros.", "convert_currency"),
    ("How many Japanese yen do I get for 50 British pounds?", "convert_currency"),
    ("Send an email to alice@example.com with the subject 'Lunch' saying that I will be 10 minutes late.", "send_email"),
    ("What time is it right now?", "get_current_time"),
]


def ask(client, model, prompt, tools=TOOLS, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], tools=tools, **kw)


def check_calls(r, allowed=None, expect_calls=True, budget_closed_ok=False):
    """The OpenAI shape of a tool-calling response (or one of its choices); every call names a
    tool and its arguments validate against that tool's schema. Returns [(name, parsed arguments)].
    `budget_closed_ok`: `length` is accepted too (calls chained until max_tokens; a call the
    budget cut off is dropped whole, so there may be none left), its calls held to the same bar."""
    ch = r.choices[0] if hasattr(r, "choices") else r
    msg = ch.message
    assert msg.role == "assistant"
    if not expect_calls:
        assert not msg.tool_calls, msg
        return []
    if budget_closed_ok and ch.finish_reason == "length" and not msg.tool_calls:
        return []
    assert msg.tool_calls, f"no tool call: finish_reason={ch.finish_reason} content={msg.content!r}"
    assert ch.finish_reason == "tool_calls" or (budget_closed_ok and ch.finish_reason == "length"), (ch.finish_reason, msg)
    assert msg.content is None or ("<tool_call>" not in msg.content and "</tool_call>" not in msg.content), msg.content
    out = []
    for call in msg.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_") and len(call.id) > len("call_")
        name = call.function.name
        assert name in (allowed or PARAMS), name
        assert isinstance(call.function.arguments, str)
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS[name])
        out.append((name, args))
    ids = [c.id for c in msg.tool_calls]
    assert len(set(ids)) == len(ids), ids
    return out


def sampled(client, model, n, **kw):
    """n seeded samples at temperature 1.0, one request per seed (8 in flight), prompts in turn:
    [(seed, choice or exception)]."""

    def one(seed):
        try:
            return ask(client, model, PROMPTS[seed % len(PROMPTS)], temperature=1.0, seed=seed, **kw).choices[0]
        except Exception as e:  # noqa: BLE001 - reported below
            return e

    with ThreadPoolExecutor(8) as pool:
        return list(enumerate(pool.map(one, range(n))))


def sampled_n(client, model, requests=5, n=10, **kw):
    """requests x n seeded samples at temperature 1.0: request i has seed i, prompt i and n
    choices (independent samples that share the prompt's prefill, which matters on a slow model):
    [((seed, choice index), choice or exception)]."""

    def one(seed):
        try:
            return ask(client, model, PROMPTS[seed % len(PROMPTS)], temperature=1.0, seed=seed, n=n, **kw).choices
        except Exception as e:  # noqa: BLE001 - reported below
            return [e] * n

    with ThreadPoolExecutor(requests) as pool:
        per_request = list(pool.map(one, range(requests)))
    return [((seed, i), c) for seed, choices in enumerate(per_request) for i, c in enumerate(choices)]


def check_all_valid(results, allowed=None):
    """Every sample's calls are valid, including those of samples that chained calls until
    max_tokens (counted apart: the model's choice at temperature 1.0, not a malformed call; the
    call the budget cut is dropped)."""
    bad, ids, cut = [], [], []
    for label, ch in results:
        try:
            if isinstance(ch, Exception):
                raise ch
            check_calls(ch, allowed, budget_closed_ok=True)
            if ch.finish_reason == "length":
                cut.append((label, len(ch.message.tool_calls or [])))
            ids += [c.id for c in ch.message.tool_calls or []]
        except Exception as e:  # noqa: BLE001 - collected so the message shows every failure
            msg = None if isinstance(ch, Exception) else (ch.finish_reason, ch.message)
            bad.append((label, f"{type(e).__name__}: {str(e)[:300]}", msg))
    print(f"{len(results) - len(bad)}/{len(results)} samples valid; (sample, calls) closed at max_tokens: {cut}")
    assert not bad, f"{len(bad)}/{len(results)} samples failed: {bad[:3]}"
    assert len(set(ids)) == len(ids), "tool call ids must be unique across responses"


def stream_calls(client, model, prompt, **kw):
    """Streams with create(stream=True), checks the delta contract and returns
    (content, [(id, name, arguments)], finish_reason)."""
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 200)
    kw.setdefault("tools", TOOLS)
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], stream=True, **kw))
    content, calls, finishes = "", {}, []
    for c in chunks:
        for ch in c.choices:
            d = ch.delta
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
            if d.content:
                assert "<tool_call>" not in d.content and "</tool_call>" not in d.content, d.content
                content += d.content
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    # The first delta of a call: index, id, type and name, arguments "".
                    assert tc.index == len(calls), "call indexes count up from 0"
                    assert tc.id and tc.id.startswith("call_") and tc.type == "function", tc
                    assert tc.function.name and tc.function.arguments in ("", None), tc
                    calls[tc.index] = [tc.id, tc.function.name, ""]
                else:
                    # Later deltas: only index and an arguments fragment.
                    assert tc.id is None and tc.type is None and tc.function.name is None, tc
                    calls[tc.index][2] += tc.function.arguments or ""
    assert len(finishes) == 1, finishes
    assert "<tool_call>" not in content
    return content, [tuple(v) for _, v in sorted(calls.items())], finishes[0]


def same_calls(streamed, plain):
    """(name, arguments) of the streamed calls equal the non-streamed ones (ids are fresh)."""
    assert [(n, a) for _, n, a in streamed] == [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls or []]


def assistant_turn(msg):
    """An SDK response message as the next request's assistant message."""
    return msg.model_dump(exclude_none=True, exclude={"refusal", "annotations", "audio", "function_call"})


# ============================ Qwen2.5-Coder-0.5B (native tool template) ============================


@pytest.fixture(scope="module")
def qwen(qwen_client):
    return qwen_client


def test_qwen_required_50_seeded_samples(qwen):
    check_all_valid(sampled_n(qwen, QWEN_MODEL, tool_choice="required"))


def test_qwen_named_50_seeded_samples(qwen):
    results = sampled_n(qwen, QWEN_MODEL, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    check_all_valid(results, allowed={"get_weather"})


def test_qwen_auto_calls_when_plainly_needed(qwen):
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda p: ask(qwen, QWEN_MODEL, p[0], tool_choice="auto"), AUTO_PROMPTS))
    hits, misses = 0, []
    for (prompt, want), r in zip(AUTO_PROMPTS, results):
        calls = check_calls(r, expect_calls=bool(r.choices[0].message.tool_calls))
        if any(name == want for name, _ in calls):
            hits += 1
        else:
            misses.append((prompt, calls, r.choices[0].message.content))
    print(f"auto: {hits}/10 prompts called the tool they need; misses: {misses}")
    assert hits >= 9, f"auto called the needed tool on {hits}/10 prompts; misses: {misses}"


def test_qwen_auto_without_need_answers_in_text(qwen):
    r = ask(qwen, QWEN_MODEL, "Say hello.", tools=[WEATHER], tool_choice="auto", max_tokens=40)
    ch = r.choices[0]
    if not ch.message.tool_calls:
        assert ch.finish_reason in ("stop", "length") and ch.message.content
    else:  # the model may still call; then it must be a valid call
        check_calls(r)


def test_qwen_none_never_calls(qwen):
    cases = [(p, kw) for p, _ in AUTO_PROMPTS[:6] for kw in (dict(), dict(temperature=1.0, seed=1))]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda c: ask(qwen, QWEN_MODEL, c[0], tool_choice="none", max_tokens=48, **c[1]), cases))
    for r in results:
        ch = r.choices[0]
        assert not ch.message.tool_calls, ch.message
        assert ch.finish_reason in ("stop", "length")
        assert "<tool_call>" not in (ch.message.content or ""), ch.message.content


def test_qwen_stream_matches_non_stream(qwen):
    cases = [dict(prompt=PROMPTS[0], tool_choice="auto"), dict(prompt=PROMPTS[2], tool_choice="required")]
    cases += [dict(prompt=PROMPTS[s % 5], tool_choice="required", temperature=1.0, seed=s) for s in range(2)]
    for case in cases:
        case = dict(case)
        prompt = case.pop("prompt")
        plain = ask(qwen, QWEN_MODEL, prompt, **case)
        content, calls, finish = stream_calls(qwen, QWEN_MODEL, prompt, **case)
        same_calls(calls, plain)
        assert finish == plain.choices[0].finish_reason
        assert (content or None) == plain.choices[0].message.content
        assert len({i for i, _, _ in calls}) == len(calls)


def test_qwen_sdk_stream_helper_accumulates_tool_calls(qwen):
    # Two calls each at temperature 0, and sampled single calls. (Sampled parallel calls can
    # chain until max_tokens, which the helper rightly refuses: LengthFinishReasonError.)
    cases = [
        dict(messages=[{"role": "user", "content": "What's the weather in Paris and in Tokyo?"}], temperature=0),
        dict(messages=[{"role": "user", "content": "Get the weather in Paris and the stock price of AAPL."}], temperature=0),
    ] + [
        dict(messages=[{"role": "user", "content": PROMPTS[seed]}], temperature=1.0, seed=seed, parallel_tool_calls=False)
        for seed in range(2)
    ]
    for case in cases:
        kw = dict(model=QWEN_MODEL, tools=TOOLS, tool_choice="required", max_tokens=200, **case)
        done = []
        with qwen.chat.completions.stream(**kw) as stream:
            for event in stream:
                if event.type == "tool_calls.function.arguments.done":
                    done.append((event.name, event.arguments))
            final = stream.get_final_completion()
        plain = qwen.chat.completions.create(**kw)
        got = [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls]
        assert got == [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls]
        assert done == got
        assert len(got) == (1 if "parallel_tool_calls" in case else 2), got
        assert final.choices[0].finish_reason == "tool_calls"
        check_calls(final)


def tool_results(msgs, message, content):
    """Appends an assistant message with tool calls and one `tool` result per call."""
    msgs.append(assistant_turn(message))
    for c in message.tool_calls:
        msgs.append({"role": "tool", "tool_call_id": c.id, "content": content})


def answer(r, *facts):
    """A plain-text turn (no calls, `stop`) that uses the tool results it was given."""
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and not ch.message.tool_calls and ch.message.content, ch
    assert "<tool_call>" not in ch.message.content and not ch.message.content.lstrip().startswith('{"name'), ch.message.content
    for fact in facts:
        assert fact in ch.message.content, (fact, ch.message.content)


def test_qwen_three_turn_round_trip(qwen):
    """user -> call -> tool result -> answer -> user -> call -> tool result -> answer, every turn
    through the template with the whole history. The answers ask for text with tool_choice
    "none" (what agent loops send once results are in): under `auto` this model calls again,
    see the xfail test below."""
    kw = dict(model=QWEN_MODEL, tools=TOOLS, temperature=0, max_tokens=200)
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r1 = qwen.chat.completions.create(messages=msgs, tool_choice="required", **kw)
    [(name, args)] = check_calls(r1)
    assert name == "get_weather" and args["city"] == "Paris", args
    tool_results(msgs, r1.choices[0].message, '{"temperature": 18, "unit": "celsius", "sky": "sunny"}')
    r2 = qwen.chat.completions.create(messages=msgs, tool_choice="none", **kw)
    answer(r2, "18")
    msgs.append(assistant_turn(r2.choices[0].message))
    msgs.append({"role": "user", "content": "And what is the weather in Tokyo?"})
    r3 = qwen.chat.completions.create(messages=msgs, tool_choice="auto", **kw)
    calls = check_calls(r3)
    assert calls[0][0] == "get_weather" and "tokyo" in calls[0][1]["city"].lower(), calls
    tool_results(msgs, r3.choices[0].message, '{"temperature": 22, "unit": "celsius", "sky": "rain"}')
    answer(qwen.chat.completions.create(messages=msgs, tool_choice="none", **kw), "22")
    ids = [c["id"] for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert len(set(ids)) == len(ids), ids


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Under tool_choice auto, Qwen2.5-Coder-0.5B re-emits the call after a tool result (its "
    "first token {\" at p=0.93; 0 of 5 tool conversations answered in text under 4 system prompts); "
    "the rendering equals Jinja2's (tokenizer_reference.rs). A model that answers makes this XPASS: "
    "drop the mark.",
)
def test_qwen_answers_from_the_tool_result(qwen):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    kw = dict(model=QWEN_MODEL, tools=TOOLS, temperature=0, max_tokens=200)
    r1 = qwen.chat.completions.create(messages=msgs, tool_choice="required", **kw)
    check_calls(r1)
    tool_results(msgs, r1.choices[0].message, '{"temperature": 18, "unit": "celsius", "sky": "sunny"}')
    answer(qwen.chat.completions.create(messages=msgs, tool_choice="auto", **kw), "18")


def test_qwen_parallel_tool_calls_false_gives_one_call(qwen):
    prompt = "What's the weather in Paris, in London and in Tokyo?"
    r = ask(qwen, QWEN_MODEL, prompt, tools=[WEATHER, NOW], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=0, n=6)
    for ch in r.choices:
        assert len(check_calls(ch)) == 1
    # Allowed in parallel, every call is still valid (and usually there are several).
    r = ask(qwen, QWEN_MODEL, prompt, tools=[WEATHER, NOW], tool_choice="required", max_tokens=300)
    print("parallel calls:", check_calls(r))


def test_qwen_parameterless_tool(qwen):
    r = ask(qwen, QWEN_MODEL, "What time is it?", tool_choice={"type": "function", "function": {"name": "get_current_time"}})
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == [("get_current_time", "{}")]
    r = ask(qwen, QWEN_MODEL, "What time is it?", tools=[NOW], tool_choice="required", parallel_tool_calls=False)
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == [("get_current_time", "{}")]


def test_qwen_server_clean_after_tools(qwen):
    """No KV block left in use and no 5xx on the Qwen server (test_zz_after_all covers SmolLM2)."""
    with httpx.Client(base_url=root(QWEN_BASE_URL), timeout=30) as h:
        wait_blocks_free(h, timeout=10)
        text = h.get("/metrics").text
    five = [l for l in text.splitlines() if l.startswith("kiln:http_requests_total{") and 'status="5' in l and 'route="/health"' not in l]
    assert not five, five


# Issue 10 item 6, as measured: neither schema says `additionalProperties`; kiln closes both.
OPEN_WEATHER = fn_tool(
    "get_weather",
    "Get the current weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
)
GET_TIME = fn_tool("get_time", "Get the current time.", {"type": "object", "properties": {}})
DECLARED = {"get_weather": {"city", "unit"}, "get_time": set()}
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


def named_time_20_seeded(client, model):
    def one(seed):
        r = ask(client, model, "What time is it in Oslo?", tools=[OPEN_WEATHER, GET_TIME], tool_choice=NAMED_TIME, temperature=1.0, seed=seed)
        return [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]

    with ThreadPoolExecutor(8) as pool:
        calls = list(pool.map(one, range(20)))
    good = sum(c == [("get_time", "{}")] for c in calls)
    print(f"named parameterless tool: {good}/20 gave '{{}}'")
    assert good == 20, [c for c in calls if c != [("get_time", "{}")]]


def test_qwen_named_parameterless_tool_20_seeded(qwen):
    named_time_20_seeded(qwen, QWEN_MODEL)


def test_qwen_required_50_sampled_declared_keys_only(qwen):
    results = sampled_n(qwen, QWEN_MODEL, tools=[OPEN_WEATHER, GET_TIME], tool_choice="required")
    bad, calls = [], 0
    for label, ch in results:
        assert not isinstance(ch, Exception), (label, ch)
        for c in ch.message.tool_calls or []:
            calls += 1
            keys = set(json.loads(c.function.arguments))
            if not keys <= DECLARED[c.function.name]:
                bad.append((label, c.function.name, c.function.arguments))
    print(f"required, T=1: {calls} calls in 50 samples, {len(bad)} with undeclared keys")
    assert calls >= 50 and not bad, bad[:5]


def budget_prefixes(client, model, seeds, budgets, **kw):
    """For each seed: the calls under each max_tokens are a prefix of the calls under 1024 (a call
    the budget cut is dropped whole, none is padded, no argument differs), `length` only when the
    budget was spent, and the streamed response drops exactly what the plain one does."""
    kw = dict(tool_choice="required", temperature=1.0, **kw)
    cut_calls = 0
    for seed in seeds:
        prompt = PROMPTS[seed % len(PROMPTS)]
        full = ask(client, model, prompt, seed=seed, max_tokens=1024, **kw)
        full_calls = [(c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls or []]
        for n in budgets:
            r = ask(client, model, prompt, seed=seed, max_tokens=n, **kw)
            ch = r.choices[0]
            calls = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []]
            assert calls == full_calls[: len(calls)], (seed, n, calls, full_calls)
            if ch.finish_reason == "length":
                assert r.usage.completion_tokens == n, (seed, n, r.usage)
                cut_calls += len(full_calls) - len(calls)
            else:
                assert (calls, ch.finish_reason) == (full_calls, full.choices[0].finish_reason), (seed, n)
        content, streamed, finish = stream_calls(client, model, prompt, seed=seed, max_tokens=budgets[0], **kw)
        plain = ask(client, model, prompt, seed=seed, max_tokens=budgets[0], **kw)
        same_calls(streamed, plain)
        assert finish == plain.choices[0].finish_reason
    print(f"budget prefixes: {len(seeds)} seeds x {budgets}: {cut_calls} calls dropped whole")


def test_qwen_budget_cuts_are_prefixes(qwen):
    budget_prefixes(qwen, QWEN_MODEL, range(10), [12, 24, 40, 60], parallel_tool_calls=False)


# ============================ SmolLM2 (generic tool format injected) ============================


def test_smol_required_and_named_10_seeded_samples(client):
    # One call per turn: at temperature 1.0 the 135M model, allowed parallel calls, may chain
    # call after call until max_tokens (valid calls, but the last one cut short).
    one = dict(parallel_tool_calls=False)
    check_all_valid(sampled(client, MODEL, 10, tool_choice="required", **one))
    named = sampled(client, MODEL, 10, tool_choice={"type": "function", "function": {"name": "convert_currency"}}, **one)
    check_all_valid(named, allowed={"convert_currency"})


def test_smol_stream_matches_non_stream(client):
    for seed in range(3):
        kw = dict(tool_choice="required", temperature=1.0, seed=seed)
        plain = ask(client, MODEL, PROMPTS[seed], **kw)
        content, calls, finish = stream_calls(client, MODEL, PROMPTS[seed], **kw)
        same_calls(calls, plain)
        # `length`: the sample chained calls until the budget; the call it cut is dropped.
        assert finish == plain.choices[0].finish_reason in ("tool_calls", "length")
        check_calls(plain, budget_closed_ok=True)
        assert content == ""


def test_smol_sdk_stream_helper(client):
    # parallel_tool_calls=False: greedy, the 135M model repeats the same call until max_tokens.
    kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200,
              parallel_tool_calls=False)
    with client.chat.completions.stream(**kw) as stream:
        list(stream)
        final = stream.get_final_completion()
    plain = client.chat.completions.create(**kw)
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls
    ]


class GetWeather(BaseModel):
    city: str = Field(max_length=40)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


def test_smol_pydantic_function_tool_parse(client):
    """`openai.pydantic_function_tool` (strict) + `.parse()`: arguments parsed into the model."""
    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Rome?"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_smol_parameterless_tool(client):
    r = ask(client, MODEL, "What time is it?", tools=[WEATHER, NOW], tool_choice={"type": "function", "function": {"name": "get_current_time"}},
            parallel_tool_calls=False)
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == [("get_current_time", "{}")]
    assert r.choices[0].finish_reason == "tool_calls"


def test_smol_named_parameterless_tool_20_seeded(client):
    named_time_20_seeded(client, MODEL)


def test_smol_budget_cuts_are_prefixes(client):
    # One call per turn: at temperature 1.0 the 135M model may otherwise chain calls to 1024 tokens.
    budget_prefixes(client, MODEL, range(25), [10, 20, 30, 40, 50, 60], parallel_tool_calls=False)


def test_smol_none_never_calls(client):
    for prompt, _ in AUTO_PROMPTS[:4]:
        r = ask(client, MODEL, prompt, tool_choice="none", max_tokens=48)
        assert not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason in ("stop", "length")


def test_smol_parallel_false_one_call(client):
    for seed in range(4):
        r = ask(client, MODEL, "Weather in Paris and in Rome?", tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
        assert len(check_calls(r)) == 1


def test_smol_multi_turn_messages_accepted(client):
    """Assistant tool_calls and role "tool" results (two in a row, as after parallel calls)."""
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "25 C, clear"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=32, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=120, temperature=0)
    check_calls(r, expect_calls=bool(r.choices[0].message.tool_calls))
    # The history alone, without tools in this request, is accepted too.
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content is not None


# ============================ errors (SmolLM2 server) ============================


def bad_request(client, **kw):
    kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=8, **kw)
    e = info.value
    assert e.status_code == 400 and e.type == "invalid_request_error" and e.message, e.body
    return e


def test_tool_errors_are_400(client):
    named = lambda n: {"type": "function", "function": {"name": n}}  # noqa: E731
    assert bad_request(client, tools=[]).param == "tools"
    assert bad_request(client, tool_choice="auto").param == "tool_choice"
    assert bad_request(client, tool_choice=named("get_weather")).param == "tool_choice"
    e = bad_request(client, tools=[WEATHER], tool_choice=named("launch_rocket"))
    assert e.param == "tool_choice" and "launch_rocket" in e.body["message"]
    assert bad_request(client, tools=[WEATHER], tool_choice="sometimes").param == "tool_choice"
    e = bad_request(client, tools=[fn_tool("bad name!", "x")])
    assert (e.param or "").startswith("tools"), e.body
    e = bad_request(client, tools=[fn_tool("x" * 65, "x")])
    assert (e.param or "").startswith("tools"), e.body
    e = bad_request(client, tools=[WEATHER, WEATHER])
    assert (e.param or "").startswith("tools"), e.body
    e = bad_request(client, tools=[{"type": "retrieval"}])
    assert (e.param or "").startswith("tools"), e.body
    e = bad_request(client, tools=[fn_tool("f", "x", {"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]}, "then": {}})], tool_choice="required")
    assert (e.param or "").startswith("tools") and '"if"' in e.body["message"], e.body


def test_response_format_with_tool_calls_is_400(client):
    rf = {"type": "json_object"}
    for choice in ("required", "auto", {"type": "function", "function": {"name": "get_weather"}}):
        assert bad_request(client, tools=[WEATHER], tool_choice=choice, response_format=rf).param == "response_format"
    assert bad_request(client, tools=[WEATHER], response_format=rf).param == "response_format"  # auto by default
    # tool_choice "none" leaves response_format in charge (and the generic template gets no tools).
    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"], "additionalProperties": False}}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object with the name and age of a person."}], response_format=person, max_tokens=150, temperature=0)
    r = client.chat.completions.create(tools=[WEATHER], tool_choice="none", **kw)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == client.chat.completions.create(**kw).choices[0].message.content


def test_bad_history_arguments_is_400(client):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    e = bad_request(client, messages=msgs, tools=[WEATHER])
    assert (e.param or "").startswith("messages"), e.body
