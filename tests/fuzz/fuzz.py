"""Fuzzes every operation of kiln's `/openapi.json` against a running server (issue 14's bar).

Cases come from Schemathesis (hypothesis strategies over the document): for each operation
POSITIVE cases (valid under the document) and NEGATIVE ones (each breaks it somewhere). They are
generated first, then sent by WORKERS threads at once, so generation requests batch in the engine.
For every case:
  - the status is < 500 (a 5xx is a server defect, whatever the input);
  - the answer arrives within HANG_S seconds (streams included: read to the end);
  - every 4xx carries OpenAI's error body: JSON {"error": {"message": str, "type": str, ...}}.
Meanwhile a thread asks `/health` every second: each answer must come within 2 s (200 or 503,
never a refused or dropped connection), and after the run it must be 200 with the server alive.

Prints one JSON summary line and exits 1 on any failure, or when fewer than MIN_CASES were sent.
Usage: fuzz.py BASE_URL   (BASE_URL = http://127.0.0.1:PORT)
Env: KILN_FUZZ_POSITIVE (per operation, 120), KILN_FUZZ_NEGATIVE (60), KILN_FUZZ_WORKERS (6),
     KILN_FUZZ_MIN_CASES (5000), KILN_FUZZ_SEED (hypothesis seed, 0), KILN_FUZZ_PATHS (a regular
     expression: only the operations whose path it finds, e.g. '^/v1/vector_stores'; default all).
"""

import collections
import concurrent.futures
import json
import os
import random
import re
import sys
import threading
import time

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import InvalidArgument, Unsatisfiable
from schemathesis import GenerationMode

BASE = sys.argv[1].rstrip("/")
POSITIVE = int(os.environ.get("KILN_FUZZ_POSITIVE", "120"))
NEGATIVE = int(os.environ.get("KILN_FUZZ_NEGATIVE", "60"))
WORKERS = int(os.environ.get("KILN_FUZZ_WORKERS", "6"))
MIN_CASES = int(os.environ.get("KILN_FUZZ_MIN_CASES", "5000"))
SEED = int(os.environ.get("KILN_FUZZ_SEED", "0"))
PATHS = re.compile(os.environ.get("KILN_FUZZ_PATHS", ""))
HANG_S = 30.0


def generate(operation, mode, count):
    """Up to `count` cases of one operation (fewer when its input space is smaller)."""
    cases = []
    strategy = operation.as_strategy(generation_mode=mode)

    @seed(SEED)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def draw(case):
        cases.append(case)

    try:
        draw()
    except (Unsatisfiable, InvalidArgument):
        # No input of this operation can break its document (no parameters, no body): there are
        # no negative cases to send, and that is not a failure.
        if mode != GenerationMode.NEGATIVE:
            raise
    return cases


def error_shape_problem(resp):
    """None when the body is OpenAI's error shape, else what is wrong."""
    try:
        body = resp.json()
    except ValueError:
        return f"not JSON: {resp.text[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"no error object: {str(body)[:200]}"
    if not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return f"error without message/type strings: {str(err)[:200]}"
    return None


def request_of(case):
    """(label, requests kwargs, what to print on failure) of a Schemathesis case."""
    label = f"{case.operation.method.upper()} {case.operation.path}"
    body = case.body if isinstance(case.body, (dict, list, str, int, float, bool, type(None))) else repr(case.body)
    shown = {"method": case.operation.method.upper(), "path": case.formatted_path, "query": case.query, "body": body}
    return label, case.as_transport_kwargs(base_url=BASE), shown


def send(req):
    """Sends one request; returns (label, status or None, problem or None, seconds)."""
    label, kwargs, _ = req
    started = time.monotonic()
    try:
        # Streamed, so a server-sent-events answer is read to its end under the same deadline.
        with requests.request(**kwargs, timeout=HANG_S, stream=True) as resp:
            body = b""
            for chunk in resp.iter_content(65536):
                body += chunk
                if time.monotonic() - started > HANG_S:
                    return label, resp.status_code, f"answer not finished within {HANG_S:.0f} s", HANG_S
            resp._content = body  # noqa: SLF001 (where requests keeps a read body)
    except requests.exceptions.Timeout:
        return label, None, f"no answer within {HANG_S:.0f} s", time.monotonic() - started
    except requests.exceptions.RequestException as e:
        return label, None, f"connection failed: {e}", time.monotonic() - started
    took = time.monotonic() - started
    if resp.status_code >= 500:
        return label, resp.status_code, f"server error: {resp.text[:300]}", took
    if resp.status_code >= 400:
        problem = error_shape_problem(resp)
        if problem:
            return label, resp.status_code, problem, took
    return label, resp.status_code, None, took


class HealthWatch(threading.Thread):
    """Asks /health every second while the fuzz runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.asked, self.failures, self.slowest = 0, [], 0.0

    def run(self):
        while not self.stop.wait(1.0):
            started = time.monotonic()
            try:
                status = requests.get(f"{BASE}/health", timeout=2).status_code
                if status not in (200, 503):
                    self.failures.append(f"/health answered {status}")
            except requests.exceptions.RequestException as e:
                self.failures.append(f"/health failed: {e}")
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.asked += 1


def main():
    document = requests.get(f"{BASE}/openapi.json", timeout=10).json()
    documented = [f"{m.upper()} {p}" for p, item in document["paths"].items() for m in item if PATHS.search(p)]
    schema = schemathesis.openapi.from_dict(document)
    operations = [op for op in (r.ok() for r in schema.get_all_operations()) if PATHS.search(op.path)]
    started = time.monotonic()
    cases = []
    for op in operations:
        for mode, count in ((GenerationMode.POSITIVE, POSITIVE), (GenerationMode.NEGATIVE, NEGATIVE)):
            cases += [request_of(c) for c in generate(op, mode, count)]
    # Schemathesis leaves out the operation serving the document itself; it takes no input, so
    # its one case is a plain GET.
    for label in set(documented) - {f"{op.method.upper()} {op.path}" for op in operations}:
        method, path = label.split(" ", 1)
        if "{" in path or "requestBody" in document["paths"][path][method.lower()]:
            sys.exit(f"Schemathesis produced no operation for {label}, which takes input")
        cases.append((label, {"method": method, "url": BASE + path}, {"method": method, "path": path}))
    # Mixed, as real traffic is: generations run beside everything else.
    random.Random(SEED).shuffle(cases)
    generated_s = time.monotonic() - started
    watch = HealthWatch()
    watch.start()
    per_op = collections.defaultdict(collections.Counter)
    statuses = collections.Counter()
    failures = []
    slowest = 0.0
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for case, (label, status, problem, took) in zip(cases, pool.map(send, cases)):
            per_op[label][str(status)] += 1
            statuses[str(status)] += 1
            slowest = max(slowest, took)
            if problem:
                failures.append({"case": case[2], "status": status, "problem": problem})
    watch.stop.set()
    watch.join()
    try:
        final_health = requests.get(f"{BASE}/health", timeout=5).status_code
    except requests.exceptions.RequestException as e:
        final_health = f"failed: {e}"
    summary = {
        "operations": len(documented), "cases": len(cases), "min_cases": MIN_CASES,
        "generate_s": round(generated_s, 1), "total_s": round(time.monotonic() - started, 1),
        "statuses": dict(sorted(statuses.items())), "slowest_case_s": round(slowest, 2),
        "health_checks": watch.asked, "health_failures": watch.failures[:10], "slowest_health_s": round(watch.slowest, 2),
        "final_health": final_health, "failures": len(failures), "per_operation": {k: dict(sorted(v.items())) for k, v in sorted(per_op.items())},
    }
    for f in failures[:20]:
        print("FAIL", json.dumps(f)[:2000], file=sys.stderr)
    print(json.dumps(summary))
    untested = [label for label in documented if not per_op.get(label)]
    ok = (not failures and not watch.failures and final_health == 200 and len(cases) >= MIN_CASES and not untested)
    if untested:
        print(f"operations without a case: {untested}", file=sys.stderr)
    if len(cases) < MIN_CASES:
        print(f"only {len(cases)} cases (the bar is {MIN_CASES})", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
