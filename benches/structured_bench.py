#!/usr/bin/env python3
"""What constrained decoding costs (issue 5), against a running kiln server (OpenAI API).

(a) Batch 1: per-output-token decode latency of a `json_schema` request vs an unconstrained
    request with the same prompt, streamed, `--runs` times each (alternating), medians.
      per token = (t_last_delta - t_first_delta) / (completion_tokens - tokens_in_first_delta)
    `completion_tokens` comes from the stream's usage (stream_options.include_usage). The tokens
    of the first delta are counted with /tokenize: the grammar may force several tokens into one
    step (the first delta can carry `{"` and more), and they were produced before t_first.
    Also reported: the naive (t_last - t_first) / (completion_tokens - 1) and the time per
    decode step ((t_last - t_first) / (deltas - 1); forced tokens ride along in a step).
(b) Aggregate tokens/s at `--concurrency` (16) closed-loop workers: all unconstrained vs half
    of them `json_schema` (even workers), `--agg-requests` requests per scenario, `--agg-runs`
    repeats, medians; plus the mean per-token latency of each class inside the mixed batch.
(c) Grammar compile: TTFT of a schema never seen before vs the same schema again (cached).

Unconstrained requests send ignore_eos so they always decode max_tokens; constrained ones end
when the schema is complete or at max_tokens. Prints one JSON line (also to --out) and a
markdown summary on stderr. Target (issue 5): constrained <= 1.10x unconstrained per token.

Requires: httpx.  Example:
  python benches/structured_bench.py --base-url http://127.0.0.1:18090 --model default
"""
import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid

import httpx

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {
            "type": "array",
            "items": {"type": "string", "enum": ["drama", "comedy", "action", "horror", "sci-fi", "romance", "documentary"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "cast": {"type": "array", "items": {"$ref": "#/$defs/actor"}, "minItems": 3, "maxItems": 5},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "awards": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "null"}]},
        "summary": {"type": "string", "maxLength": 400},
    },
    "required": ["title", "year", "genres", "cast", "rating", "awards", "summary"],
    "additionalProperties": False,
    "$defs": {
        "actor": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "role": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 5, "maximum": 100},
            },
            "required": ["name", "role", "age"],
            "additionalProperties": False,
        }
    },
}

PROMPT = ("Describe a classic adventure movie: its title, year, genres, the main cast with their roles and ages, "
          "a rating out of 10, the number of awards it won and a long summary of the plot.")


def body(args, prompt, constrained, schema=None):
    b = {
        "model": args.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "movie", "schema": schema or SCHEMA, "strict": True}}
    else:
        b["ignore_eos"] = True
    return b


def parse_sse_line(line, rec, now):
    if not line.startswith("data:"):
        return False
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    obj = json.loads(data)
    if "error" in obj:
        raise RuntimeError(f"stream error: {obj['error']}")
    if obj.get("usage"):
        rec["usage"] = obj["usage"]
    for ch in obj.get("choices") or []:
        text = (ch.get("delta") or {}).get("content")
        if text:
            if rec["t_first"] is None:
                rec["t_first"], rec["first_text"] = now, text
            rec["t_last"] = now
            rec["deltas"] += 1
            rec["text"] += text
        if ch.get("finish_reason"):
            rec["finish"] = ch["finish_reason"]
    return False


def new_rec(constrained):
    return {"constrained": constrained, "t_first": None, "t_last": None, "first_text": "", "text": "", "deltas": 0, "usage": None, "finish": None}


def finish_rec(rec, t0, t_end, first_tokens):
    comp = rec["usage"]["completion_tokens"] if rec["usage"] else None
    span = (rec["t_last"] - rec["t_first"]) if rec["t_first"] is not None else None
    out = {
        "constrained": rec["constrained"],
        "completion_tokens": comp,
        "finish_reason": rec["finish"],
        "ttft_s": (rec["t_first"] - t0) if rec["t_first"] is not None else None,
        "e2e_s": t_end - t0,
        "deltas": rec["deltas"],
        "first_delta_tokens": first_tokens,
    }
    if span and comp and comp - first_tokens > 0:
        out["ms_per_token"] = 1000 * span / (comp - first_tokens)
        out["ms_per_token_naive"] = 1000 * span / (comp - 1)
    if span and rec["deltas"] > 1:
        out["ms_per_step"] = 1000 * span / (rec["deltas"] - 1)
    if rec["constrained"]:
        try:
            json.loads(rec["text"])
            out["valid_json"] = True
        except json.JSONDecodeError:
            out["valid_json"] = False  # expected only when cut at max_tokens
    return out


def count_tokens(client, base, text):
    if not text:
        return 0
    r = client.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False})
    r.raise_for_status()
    return r.json()["count"]


def one_sync(client, args, prompt, constrained, schema=None):
    rec = new_rec(constrained)
    t0 = time.perf_counter()
    with client.stream("POST", f"{args.base}/v1/chat/completions", json=body(args, prompt, constrained, schema)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if parse_sse_line(line, rec, time.perf_counter()):
                break
    t_end = time.perf_counter()
    return finish_rec(rec, t0, t_end, count_tokens(client, args.base, rec["first_text"]))


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def batch1(args, client):
    one_sync(client, args, PROMPT, False)  # warm-up (and the grammar compile)
    one_sync(client, args, PROMPT, True)
    runs = {"unconstrained": [], "constrained": []}
    for _ in range(args.runs):
        runs["unconstrained"].append(one_sync(client, args, PROMPT, False))
        runs["constrained"].append(one_sync(client, args, PROMPT, True))
    summary = {}
    for k, rs in runs.items():
        summary[k] = {
            "ms_per_token_median": med([r.get("ms_per_token") for r in rs]),
            "ms_per_token_naive_median": med([r.get("ms_per_token_naive") for r in rs]),
            "ms_per_step_median": med([r.get("ms_per_step") for r in rs]),
            "ttft_ms_median": med([1000 * r["ttft_s"] for r in rs if r["ttft_s"] is not None]),
            "completion_tokens": [r["completion_tokens"] for r in rs],
            "first_delta_tokens": [r["first_delta_tokens"] for r in rs],
            "finish_reasons": sorted({r["finish_reason"] for r in rs}),
        }
        if k == "constrained":
            summary[k]["valid_json"] = [r.get("valid_json") for r in rs]
    u, c = summary["unconstrained"], summary["constrained"]
    for key in ("ms_per_token_median", "ms_per_token_naive_median", "ms_per_step_median"):
        if u[key] and c[key]:
            summary["ratio_" + key.replace("_median", "")] = round(c[key] / u[key], 3)
    summary["runs"] = runs
    return summary


async def one_async(client, args, prompt, constrained):
    rec = new_rec(constrained)
    t0 = time.perf_counter()
    async with client.stream("POST", f"{args.base}/v1/chat/completions", json=body(args, prompt, constrained)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if parse_sse_line(line, rec, time.perf_counter()):
                break
    # First-delta tokens are not counted here (no extra requests under load): per token uses
    # the naive formula.
    return finish_rec(rec, t0, time.perf_counter(), 1)


async def aggregate_once(args, mixed):
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    queue = asyncio.Queue()
    for i in range(args.agg_requests):
        queue.put_nowait(i)
    results = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:

        async def worker(w):
            constrained = mixed and w % 2 == 0
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                # A unique opening per request: no server may reuse an earlier prefix.
                prompt = f"Request {uuid.uuid4().hex[:12]}-{i}. {PROMPT}"
                results.append(await one_async(client, args, prompt, constrained))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        wall = time.perf_counter() - t0
    toks = sum(r["completion_tokens"] or 0 for r in results)
    out = {"wall_s": round(wall, 3), "completion_tokens": toks, "agg_tok_s": round(toks / wall, 2)}
    for name, flag in (("unconstrained", False), ("constrained", True)):
        rs = [r for r in results if r["constrained"] == flag]
        if rs:
            out[name] = {
                "requests": len(rs),
                "tokens": sum(r["completion_tokens"] or 0 for r in rs),
                "ms_per_token_mean": round(statistics.mean([r["ms_per_token"] for r in rs if r.get("ms_per_token")]), 3),
            }
    return out


def aggregate(args):
    scen = {}
    for name, mixed in (("all_unconstrained", False), ("half_constrained", True)):
        reps = [asyncio.run(aggregate_once(args, mixed)) for _ in range(args.agg_runs)]
        scen[name] = {"agg_tok_s_median": med([r["agg_tok_s"] for r in reps]), "reps": reps}
    a, b = scen["all_unconstrained"]["agg_tok_s_median"], scen["half_constrained"]["agg_tok_s_median"]
    scen["ratio_agg_tok_s_half_vs_all"] = round(b / a, 3) if a and b else None
    return scen


def compile_cost(args, client):
    """TTFT with a schema never seen (unique description: a new cache key) vs the same again."""
    fresh, cached = [], []
    for _ in range(3):
        schema = dict(SCHEMA, description=f"variant {uuid.uuid4().hex}")
        fresh.append(one_sync(client, args, PROMPT, True, schema)["ttft_s"])
        cached.append(one_sync(client, args, PROMPT, True, schema)["ttft_s"])
    return {"ttft_ms_new_schema_median": med([1000 * x for x in fresh]), "ttft_ms_cached_schema_median": med([1000 * x for x in cached])}


def markdown(res):
    b, a = res["batch1"], res["aggregate"]
    u, c = b["unconstrained"], b["constrained"]
    lines = [
        f"### Constrained decoding cost ({res['model']}, max_tokens {res['max_tokens']}, {res['runs']} runs, medians)",
        "",
        "| batch 1 | unconstrained | json_schema | ratio |",
        "|---|---:|---:|---:|",
        f"| ms / output token | {u['ms_per_token_median']} | {c['ms_per_token_median']} | {b.get('ratio_ms_per_token')} |",
        f"| ms / output token (naive, (t_last-t_first)/(n-1)) | {u['ms_per_token_naive_median']} | {c['ms_per_token_naive_median']} | {b.get('ratio_ms_per_token_naive')} |",
        f"| ms / decode step | {u['ms_per_step_median']} | {c['ms_per_step_median']} | {b.get('ratio_ms_per_step')} |",
        f"| TTFT ms | {u['ttft_ms_median']} | {c['ttft_ms_median']} | |",
        f"| completion tokens | {u['completion_tokens']} | {c['completion_tokens']} | |",
        "",
        f"| {res['concurrency']} concurrent | agg tok/s (median) |",
        "|---|---:|",
        f"| all unconstrained | {a['all_unconstrained']['agg_tok_s_median']} |",
        f"| half json_schema | {a['half_constrained']['agg_tok_s_median']} |",
        f"| ratio | {a['ratio_agg_tok_s_half_vs_all']} |",
        "",
    ]
    mixed = a["half_constrained"]["reps"][0]
    if "constrained" in mixed and "unconstrained" in mixed:
        lines.append(f"In the mixed batch (first rep): ms/token unconstrained {mixed['unconstrained']['ms_per_token_mean']}, "
                     f"constrained {mixed['constrained']['ms_per_token_mean']} (naive per-token, includes forced tokens).")
    if res.get("compile"):
        lines.append(f"Grammar compile: TTFT {res['compile']['ttft_ms_new_schema_median']} ms with a new schema, "
                     f"{res['compile']['ttft_ms_cached_schema_median']} ms cached.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:18090")
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--agg-requests", type=int, default=32, help="requests per aggregate scenario")
    ap.add_argument("--agg-runs", type=int, default=3)
    ap.add_argument("--skip-aggregate", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args()
    args.base = args.base_url.rstrip("/").removesuffix("/v1")
    res = {"model": args.model, "max_tokens": args.max_tokens, "runs": args.runs, "concurrency": args.concurrency}
    with httpx.Client(timeout=args.timeout) as client:
        res["batch1"] = batch1(args, client)
        res["compile"] = compile_cost(args, client)
    if not args.skip_aggregate:
        res["aggregate"] = aggregate(args)
    line = json.dumps(res)
    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    if "aggregate" in res:
        print(markdown(res), file=sys.stderr)
    else:
        print(json.dumps({k: v for k, v in res["batch1"].items() if k != "runs"}, indent=1), file=sys.stderr)
    ratio = res["batch1"].get("ratio_ms_per_token")
    if ratio is not None:
        print(f"constrained / unconstrained per output token at batch 1: {ratio:.3f} (target <= 1.10)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
