"""Structured outputs (issue 5) through the official SDK on the default SmolLM2 server:
`client.chat.completions.parse(response_format=PydanticModel)` for a varied set of models,
`json_object` over seeded samples, raw `json_schema` keywords, streaming, `n`, invariance under
concurrency, `/v1/completions`, and the 400s for what the grammar engine cannot honour.

Every list has a `max_length` and every free string a `max_length`: those bounds (maxItems /
maxLength, honoured by the grammar) are what keep a 135M model from looping inside an array or a
string until `max_tokens`.
"""

import datetime
import json
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated, List, Literal, Optional, Tuple, Union

import jsonschema
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema  # exactly the schema `.parse()` sends
from pydantic import BaseModel, Field, conlist

from conftest import MODEL

Name = Annotated[str, Field(max_length=40)]
Short = Annotated[str, Field(max_length=20)]
Text = Annotated[str, Field(max_length=120)]


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"
    yellow = "yellow"


class Priority(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"


class Weekday(str, Enum):
    monday = "monday"
    tuesday = "tuesday"
    wednesday = "wednesday"
    thursday = "thursday"
    friday = "friday"
    saturday = "saturday"
    sunday = "sunday"


class Person(BaseModel):
    name: Name
    age: int = Field(ge=0, le=120)


class City(BaseModel):
    name: Name
    country: Name
    population: int = Field(ge=0, le=50_000_000)


class Book(BaseModel):
    title: Name
    author: Name
    year: int = Field(ge=1400, le=2030)
    genres: List[Short] = Field(max_length=3)


class Recipe(BaseModel):
    name: Name
    ingredients: conlist(Short, min_length=1, max_length=5)
    minutes: int = Field(ge=1, le=600)
    vegetarian: bool


class Task(BaseModel):
    title: Name
    priority: Priority
    done: bool


class Palette(BaseModel):
    name: Short
    colors: List[Color] = Field(min_length=1, max_length=4)


class Address(BaseModel):
    street: Name
    city: Short
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Contact(BaseModel):
    name: Name
    email: Optional[Name]
    phone: Optional[Short] = None


class Company(BaseModel):
    name: Name
    headquarters: Address
    employees: int = Field(ge=1, le=1_000_000)


class Team(BaseModel):
    name: Short
    members: List[Person] = Field(max_length=3)


class Event(BaseModel):
    title: Name
    day: Weekday
    start_hour: int = Field(ge=0, le=23)
    duration_hours: float = Field(ge=0.5, le=12)


class Product(BaseModel):
    name: Name
    price: float = Field(ge=0, le=10_000)
    currency: Literal["USD", "EUR", "GBP"]
    in_stock: bool


class Review(BaseModel):
    product: Name
    rating: int = Field(ge=1, le=5)
    summary: Text
    would_recommend: bool


class Flight(BaseModel):
    code: str = Field(pattern=r"^[A-Z]{2}[0-9]{3,4}$")
    origin: str = Field(pattern=r"^[A-Z]{3}$")
    destination: str = Field(pattern=r"^[A-Z]{3}$")
    seats_left: int = Field(ge=0, le=500)


class Animal(BaseModel):
    species: Name
    kind: Literal["mammal", "bird", "fish", "reptile", "amphibian", "insect"]
    legs: int = Field(ge=0, le=100)
    can_fly: bool


class OrderItem(BaseModel):
    sku: Short
    quantity: int = Field(ge=1, le=100)


class Order(BaseModel):
    order_id: Short
    items: List[OrderItem] = Field(min_length=1, max_length=3)
    status: Literal["pending", "shipped", "delivered"]


class Circle(BaseModel):
    kind: Literal["circle"]
    radius: float = Field(gt=0, le=100)


class Rectangle(BaseModel):
    kind: Literal["rectangle"]
    width: float = Field(gt=0, le=100)
    height: float = Field(gt=0, le=100)


class Drawing(BaseModel):
    title: Short
    shapes: List[Union[Circle, Rectangle]] = Field(min_length=1, max_length=3)


class Pet(BaseModel):
    name: Short
    species: Literal["cat", "dog", "rabbit", "parrot"]
    owner: Optional[Person]


class Point(BaseModel):
    x: int = Field(ge=-1000, le=1000)
    y: int = Field(ge=-1000, le=1000)


class Route(BaseModel):
    name: Short
    points: List[Point] = Field(min_length=2, max_length=4)
    loop: bool


class Appointment(BaseModel):
    patient: Name
    date: datetime.date
    reason: Text


class Translation(BaseModel):
    source_language: Literal["en", "fr", "de", "es"]
    target_language: Literal["en", "fr", "de", "es"]
    text: Text
    translation: Text


class Forecast(BaseModel):
    city: Short
    days: List[Annotated[int, Field(ge=-50, le=60)]] = Field(min_length=3, max_length=3)
    summary: Short


class Inventory(BaseModel):
    warehouse: Short
    counts: Tuple[int, int, int]
    tags: List[Short] = Field(max_length=2)


class Survey(BaseModel):
    respondent: Person
    answers: List[Literal["yes", "no", "maybe"]] = Field(min_length=1, max_length=5)
    comment: Optional[Text]


class Version(BaseModel):
    name: Short
    major: int = Field(ge=0, le=99)
    minor: int = Field(ge=0, le=99)
    stable: Literal[True]


# (model, prompt): a prompt that gives the model something to fill in.
CASES = [
    (Person, "Describe a person named Alice who is 30 years old."),
    (City, "Give facts about Paris."),
    (Book, "Describe the novel Moby Dick."),
    (Recipe, "Give me a simple pancake recipe."),
    (Task, "Create a to-do item: buy milk, urgent, not done yet."),
    (Palette, "Suggest a color palette for a beach house."),
    (Address, "Write the address of a bakery in Springfield."),
    (Contact, "Make a contact card for Bob Smith, email bob@example.com."),
    (Company, "Describe a small software company and its headquarters."),
    (Team, "Describe a team of three football players."),
    (Event, "Schedule a two-hour team meeting on Monday morning."),
    (Product, "Describe a coffee mug for sale in an online store."),
    (Review, "Write a short review of a pair of running shoes."),
    (Flight, "Give me a flight from Paris to London."),
    (Animal, "Describe an eagle."),
    (Order, "Create an order of two books and one pen."),
    (Drawing, "Describe a drawing made of a circle and a square."),
    (Pet, "Describe a dog named Rex and its owner Tom, 40 years old."),
    (Route, "Give a short walking route through a park as points on a grid."),
    (Appointment, "Book a dentist appointment for John on March 3rd, 2025."),
    (Translation, "Translate 'good morning' from English to French."),
    (Forecast, "Give a three-day temperature forecast for Oslo."),
    (Inventory, "Report the stock counts of three products in a warehouse."),
    (Survey, "Record a survey answer from a 25-year-old named Maria."),
    (Version, "Describe the latest stable release of a program."),
]

IDS = [m.__name__ for m, _ in CASES]


def parse_one(client, model_cls, prompt, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 300)
    return client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=model_cls, **kw
    )


@pytest.fixture(scope="module")
def parsed(client):
    """All pydantic cases at once (4 in flight): name -> the ParsedChatCompletion or the exception."""

    def run(case):
        model_cls, prompt = case
        try:
            return parse_one(client, model_cls, prompt)
        except Exception as e:  # noqa: BLE001 - reported per case below
            return e

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(IDS, pool.map(run, CASES)))


def test_at_least_20_models():
    assert len(CASES) >= 20 and len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("model_cls,prompt", CASES, ids=IDS)
def test_parse_pydantic(parsed, model_cls, prompt):
    r = parsed[model_cls.__name__]
    if isinstance(r, openai.LengthFinishReasonError):
        pytest.fail(f"{model_cls.__name__}: hit max_tokens: {r.completion.choices[0].message.content!r}")
    if isinstance(r, Exception):
        pytest.fail(f"{model_cls.__name__}: {type(r).__name__}: {r}")
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch
    assert ch.message.refusal is None
    assert isinstance(ch.message.parsed, model_cls), ch.message
    # The raw text is one JSON value valid under the exact schema that was sent.
    value = json.loads(ch.message.content)
    jsonschema.validate(value, to_strict_json_schema(model_cls))
    assert model_cls.model_validate(value) == ch.message.parsed


def test_parse_is_deterministic_and_seeded(client):
    """Greedy twice gives the same object; seeded sampling is reproducible and still valid."""
    a = parse_one(client, Book, "Describe a famous book.")
    b = parse_one(client, Book, "Describe a famous book.")
    assert a.choices[0].message.content == b.choices[0].message.content
    outs = [parse_one(client, Book, "Describe a famous book.", temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert all(isinstance(o.choices[0].message.parsed, Book) for o in outs)
    assert outs[0].choices[0].message.content == outs[1].choices[0].message.content


# --- sampled parse() with free strings (issue 10 item 6) --------------------------------------
#
# Lists bounded, strings not: what a user's plain pydantic model looks like. At temperature 1.0
# with OpenAI's neutral sampling a 135M model drifts inside a free string until max_tokens; the
# server's default sampling for this model (llama.cpp's top-k 40, top-p 0.95, min-p 0.05 plus
# repetition_penalty 1.1, under the request's own fields, shown in GET /v1/models/{id}) keeps it
# on track. Measured on 100 samples (benches/parse_compare.sh): 99 parse with these, 89 without
# the penalty, 88 with OpenAI's neutral sampling.


class Recipe(BaseModel):
    title: str
    ingredients: conlist(str, max_length=5)
    minutes: int


class Movie(BaseModel):
    title: str
    year: int
    genres: conlist(str, max_length=3)


class Contact(BaseModel):
    name: str
    email: str
    city: str


class Trip(BaseModel):
    destination: str
    days: int
    activities: conlist(str, max_length=4)


class Review(BaseModel):
    product: str
    rating: int
    summary: str


FREE_STRING_CASES = [
    (Recipe, "Give me a simple pancake recipe."),
    (Movie, "Describe a classic science fiction movie."),
    (Contact, "Make up a contact card for a friend."),
    (Trip, "Plan a short trip to Italy."),
    (Review, "Review a pair of running shoes."),
]


def test_default_sampling_params_are_visible(client):
    card = client.models.retrieve(MODEL).model_extra
    # run.sh starts the default model as scripts/run.sh does: llama.cpp's fallback + its penalty.
    assert card["default_sampling_params"] == {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1}, card


def test_sampled_parse_with_free_strings_24_of_25(client):
    """25 seeded samples at temperature 1.0 (5 per model): >= 24 parse."""

    def one(case):
        (model_cls, prompt), seed = case
        try:
            r = parse_one(client, model_cls, prompt, temperature=1.0, seed=seed)
            return "ok" if isinstance(r.choices[0].message.parsed, model_cls) else f"not parsed: {r.choices[0]}"
        except Exception as e:  # noqa: BLE001 - counted below (LengthFinishReasonError above all)
            return f"{type(e).__name__}: {str(e)[:200]}"

    cases = [(c, seed) for c in FREE_STRING_CASES for seed in range(5)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, cases))
    failed = [(c[0][0].__name__, c[1], r) for c, r in zip(cases, results) if r != "ok"]
    print(f"sampled parse(): {25 - len(failed)}/25 parsed; failures: {failed}")
    assert len(failed) <= 1, failed


# --- json_object -----------------------------------------------------------------------------

JSON_OBJECT_PROMPT = "Describe your favourite animal as a JSON object with a name, a habitat and a fun fact."


def json_object_sample(client, seed):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": JSON_OBJECT_PROMPT}],
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=seed,
        max_tokens=200,
    )


def test_json_object_50_seeded_samples(client):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: json_object_sample(client, s), range(50)))
    bad, cut = [], []
    for seed, r in enumerate(results):
        ch = r.choices[0]
        if ch.finish_reason == "length":
            # The budget ran out: an honest truncation, never JSON kiln made up to look whole.
            assert r.usage.completion_tokens == 200, (seed, r.usage)
            cut.append(seed)
            continue
        try:
            ok = isinstance(json.loads(ch.message.content), dict) and ch.finish_reason == "stop"
        except json.JSONDecodeError:
            ok = False
        if not ok:
            bad.append((seed, ch.finish_reason, ch.message.content))
    # Every output either parses as an object (`stop`) or says `length` with the budget spent.
    print(f"json_object: {50 - len(bad) - len(cut)}/50 parse as objects; cut by max_tokens: {cut}")
    assert not bad, f"{len(bad)}/50 samples neither an object nor cut by the budget: {bad[:3]}"
    # Seeded: the same seed gives the same object (under the load above and alone).
    assert json_object_sample(client, 7).choices[0].message.content == results[7].choices[0].message.content
    assert len({r.choices[0].message.content for r in results}) > 10, "seeds should give different samples"


def test_text_format_is_plain(client):
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, response_format={"type": "text"}
    )
    assert r.choices[0].message.content == plain.choices[0].message.content


# --- raw json_schema keywords ------------------------------------------------------------------

RAW_SCHEMAS = {
    "const_and_enum": {
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "kind": {"enum": ["a", "b", 3, None]},
            "label": {"type": "string", "maxLength": 10},
        },
        "required": ["version", "kind", "label"],
        "additionalProperties": False,
    },
    "refs_and_defs": {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["name", "qty"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 2, "maxItems": 3}},
        "required": ["items"],
        "additionalProperties": False,
    },
    "any_of_types": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "string", "maxLength": 8}, {"type": "null"}]},
            "flag": {"type": "boolean"},
        },
        "required": ["value", "flag"],
        "additionalProperties": False,
    },
    "pattern_and_bounds": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "count": {"type": "integer", "minimum": 10, "maximum": 20},
        },
        "required": ["code", "score", "count"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"type": "string", "enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 4},
    "nested_arrays": {
        "type": "object",
        "properties": {
            "grid": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2},
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["grid"],
        "additionalProperties": False,
    },
    "optional_property": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "nickname": {"type": "string", "maxLength": 10}},
        "required": ["name"],
        "additionalProperties": False,
    },
}


def schema_format(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", list(RAW_SCHEMAS))
def test_raw_json_schema(client, name):
    schema = RAW_SCHEMAS[name]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Fill in the requested data."}],
        response_format=schema_format(name, schema),
        temperature=0,
        max_tokens=200,
    )
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch
    jsonschema.validate(json.loads(ch.message.content), schema)


# --- streaming, n, concurrency -------------------------------------------------------------------


def test_stream_equals_non_stream(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a book you like."}],
        response_format=schema_format("Book", to_strict_json_schema(Book)),
        max_tokens=300,
    )
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        plain = client.chat.completions.create(**kw, **sampling)
        chunks = list(client.chat.completions.create(**kw, **sampling, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        assert text == plain.choices[0].message.content
        assert Book.model_validate_json(text)
        finals = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finals == ["stop"] == [plain.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_helper_parses(client):
    """The SDK's `.stream()` helper with a pydantic response_format: parsed deltas, final object."""
    with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe an eagle."}],
        response_format=Animal,
        temperature=0,
        max_tokens=300,
    ) as stream:
        kinds = {e.type for e in stream}
        final = stream.get_final_completion()
    assert "content.done" in kinds
    assert isinstance(final.choices[0].message.parsed, Animal)
    plain = parse_one(client, Animal, "Describe an eagle.")
    assert final.choices[0].message.content == plain.choices[0].message.content


def test_n_choices_each_valid(client):
    """n > 1: every fork carries its own grammar state."""
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a city."}],
        response_format=schema_format("City", to_strict_json_schema(City)),
        temperature=1.0,
        seed=5,
        max_tokens=200,
        n=3,
    )
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.finish_reason == "stop"
        City.model_validate_json(c.message.content)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    texts = ["".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == i) for i in range(3)]
    assert texts == [c.message.content for c in r.choices]


def test_constrained_and_plain_unchanged_under_concurrency(client):
    """A constrained request and a plain one give the same greedy output alone and side by side
    (masks apply only to the sequence that asked for them)."""
    plain_kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name three rivers."}], max_tokens=32, temperature=0)
    plain_alone = client.chat.completions.create(**plain_kw).choices[0].message.content
    structured_alone = {m.__name__: parse_one(client, m, p).choices[0].message.content for m, p in CASES[:4]}
    with ThreadPoolExecutor(8) as pool:
        plains = [pool.submit(lambda: client.chat.completions.create(**plain_kw).choices[0].message.content) for _ in range(3)]
        structs = {m.__name__: pool.submit(parse_one, client, m, p) for m, p in CASES[:4]}
        assert [f.result() for f in plains] == [plain_alone] * 3
        assert {k: f.result().choices[0].message.content for k, f in structs.items()} == structured_alone


# --- /v1/completions ---------------------------------------------------------------------------


def test_completions_json_schema(client):
    schema = to_strict_json_schema(Person)
    kw = dict(model=MODEL, prompt="A person described as JSON:", max_tokens=100, temperature=0)
    r = client.completions.create(**kw, extra_body={"response_format": schema_format("Person", schema)})
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    # Streamed: the same text.
    chunks = list(client.completions.create(**kw, stream=True, extra_body={"response_format": schema_format("Person", schema)}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_completions_json_object(client):
    parsed = 0
    for seed in range(5):
        r = client.completions.create(
            model=MODEL,
            prompt='A car as a JSON object with the keys "make", "model" and "year":\n',
            max_tokens=150,
            temperature=0.5,
            seed=seed,
            extra_body={"response_format": {"type": "json_object"}},
        )
        # Either a whole object, or the budget honestly spent (never JSON closed by kiln).
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == 150, r.usage
            continue
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        assert isinstance(json.loads(r.choices[0].text), dict)
        parsed += 1
    assert parsed >= 3, f"only {parsed}/5 seeds gave a whole object"


# --- what the grammar engine cannot honour: 400 naming it -----------------------------------------

UNSUPPORTED = [
    # (schema, a word the message must name)
    ({"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]}, "then": {"required": ["a"]}}, "if"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "made-up-format"}}, "required": ["d"]}, "made-up-format"),
    ({"type": "object", "properties": {"a": {"type": "array", "contains": {"type": "integer"}}}}, "contains"),
]


def check_400(e, keyword, param="response_format"):
    assert e.status_code == 400
    assert e.param == param, e.body
    assert e.type == "invalid_request_error"
    msg = e.body["message"]
    assert f'"{keyword}"' in msg or f" {keyword}" in msg or f"'{keyword}'" in msg, msg


@pytest.mark.parametrize("schema,keyword", UNSUPPORTED, ids=[k for _, k in UNSUPPORTED])
def test_unsupported_keyword_is_400_naming_it(client, schema, keyword):
    fmt = schema_format("bad", schema)
    msgs = [{"role": "user", "content": "Hi"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, max_tokens=8, stream=stream)
        check_400(info.value, keyword)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, extra_body={"response_format": fmt})
    check_400(info.value, keyword)


def test_malformed_response_format_is_400(client):
    msgs = [{"role": "user", "content": "Hi"}]
    for fmt in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, max_tokens=8)
        assert info.value.status_code == 400 and (info.value.param or "").startswith("response_format"), info.value.body
