"""`client.chat.completions.parse` at temperature 1.0 over 5 pydantic models that bound lists but
not string lengths, SEEDS seeds each (default 5; issue 10 item 6): how many samples parse, per
server.
The same models and prompts as tests/python/test_structured.py. Prints one JSON line per server.

Usage: python parse_bench.py NAME=BASE_URL[@MODEL] ...   (e.g. kiln=http://127.0.0.1:8080/v1@default)
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
from pydantic import BaseModel, conlist


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


CASES = [
    (Recipe, "Give me a simple pancake recipe."),
    (Movie, "Describe a classic science fiction movie."),
    (Contact, "Make up a contact card for a friend."),
    (Trip, "Plan a short trip to Italy."),
    (Review, "Review a pair of running shoes."),
]


def run(base_url, model):
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    def one(case):
        (cls, prompt), seed = case
        try:
            r = client.chat.completions.parse(
                model=model, messages=[{"role": "user", "content": prompt}], response_format=cls,
                temperature=1.0, seed=seed, max_tokens=300,
            )
            return "ok" if isinstance(r.choices[0].message.parsed, cls) else "unparsed"
        except openai.LengthFinishReasonError:
            return "length"
        except Exception as e:  # noqa: BLE001 - reported
            return f"{type(e).__name__}: {str(e)[:120]}"

    cases = [(c, s) for c in CASES for s in range(int(os.environ.get("SEEDS", "5")))]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, cases))
    failures = [(c[0][0].__name__, c[1], r) for c, r in zip(cases, results) if r != "ok"]
    return {"parsed": len(cases) - len(failures), "of": len(cases), "failures": failures}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        name, target = arg.split("=", 1)
        base_url, _, model = target.partition("@")
        print(json.dumps({"server": name, **run(base_url, model or "default")}), flush=True)
