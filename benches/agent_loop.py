"""Per-step cost of kiln's in-process tool loop against the same loop driven from outside.

Two `kiln serve` processes on one model: A (defaults: sessions, prefix caching) runs a server-side
agent whose tool (an HTTP tool served by this script) is called once per step; B
(`--no-prefix-caching`) is driven the way an external framework drives a model: at every step the
whole conversation so far (the agent's own recorded messages, so both sides see the same tokens)
goes to /v1/chat/completions with the same tools. Prints one JSON line: per-step latency and
prefilled tokens of each side and their ratio (the issue's bar: agent <= 1/3 of external).

Usage: benches/agent_loop.sh (builds kiln, fetches Qwen2.5-Coder-0.5B, starts both servers).
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STEPS = int(os.environ.get("STEPS", "6"))


class Clues(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        n = int(body.get("n", 0))
        text = f"Clue {n}: the {n}th ingredient of the recipe is " + ", ".join(f"item-{n}-{i}" for i in range(12))
        out = json.dumps({"clue": text, "next": n + 1 if n < STEPS else None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def call(base, method, path, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve(kiln, model, port, extra):
    args = [kiln, "serve", "--model", model, "--served-model-name", "m", "--port", str(port)] + extra
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return p, base
        except Exception:
            time.sleep(0.2)
    p.kill()
    sys.exit(f"kiln on {port} did not start")


def main():
    kiln, model = sys.argv[1], sys.argv[2]
    tools = ThreadingHTTPServer(("127.0.0.1", 0), Clues)
    threading.Thread(target=tools.serve_forever, daemon=True).start()
    tport = tools.server_address[1]
    tmp = tempfile.mkdtemp()
    os.makedirs(f"{tmp}/agents")
    agent = f'''name = "collector"
instructions = "Collect the recipe clues: call get_clue with n = 1, then with the number in 'next', until 'next' is null. Then list the clues."
model = "m"
tools = ["get_clue"]
max_steps = {STEPS + 2}
max_tokens_per_step = 40
temperature = 0

[[http_tools]]
name = "get_clue"
description = "Returns clue number n"
method = "POST"
url = "http://127.0.0.1:{tport}/clue"
parameters = {{ type = "object", properties = {{ n = {{ type = "integer" }} }}, required = ["n"] }}
'''
    open(f"{tmp}/agents/collector.toml", "w").write(agent)
    a, abase = serve(kiln, model, 18731, ["--agents", f"{tmp}/agents", "--data-dir", f"{tmp}/data",
                                           "--http-tool-hosts", f"127.0.0.1:{tport}", "--kv-cache-memory", "1G"])
    b, bbase = serve(kiln, model, 18732, ["--no-prefix-caching", "--kv-cache-memory", "1G"])
    try:
        run = call(abase, "POST", "/v1/agents/collector/runs", {"input": "Start."})
        steps = call(abase, "GET", f"/v1/runs/{run['id']}/steps")["data"]
        turns = [s["data"] for s in steps if s["kind"] == "model_output" and not s["data"].get("discarded")]
        # The external client: the same conversation, step by step, whole each time.
        system = "Collect the recipe clues: call get_clue with n = 1, then with the number in 'next', until 'next' is null. Then list the clues."
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Start."}]
        tool = {"type": "function", "function": {"name": "get_clue", "description": "Returns clue number n",
                "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
        results = {s["data"]["call_id"]: s["data"]["content"] for s in steps if s["kind"] == "tool_result"}
        ext = []
        for t in turns:
            req = {"model": "m", "messages": msgs, "tools": [tool], "temperature": 0,
                   "max_tokens": max(1, t["completion_tokens"])}
            t0 = time.perf_counter()
            out = call(bbase, "POST", "/v1/chat/completions", req)
            ext.append({"ms": (time.perf_counter() - t0) * 1000, "prompt_tokens": out["usage"]["prompt_tokens"]})
            calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for c in t["calls"]]
            msgs.append({"role": "assistant", "content": t["content"] or None, **({"tool_calls": calls} if calls else {})})
            msgs += [{"role": "tool", "tool_call_id": c["id"], "content": results.get(c["id"], "")} for c in t["calls"]]
        agent_ms = [t["latency_ms"] for t in turns]
        agent_prefill = [t["prompt_tokens"] - t["cached_tokens"] for t in turns]
        later = slice(1, None)  # step 1 prefills the prompt on both sides
        mean = lambda xs: sum(xs) / max(1, len(xs))
        a_ms, e_ms = mean(agent_ms[later]), mean([e["ms"] for e in ext][later])
        print(json.dumps({
            "model": os.path.basename(model), "status": run["status"], "steps": len(turns),
            "agent_ms_per_step": agent_ms, "agent_prefilled_tokens": agent_prefill,
            "external_ms_per_step": [round(e["ms"]) for e in ext],
            "external_prompt_tokens": [e["prompt_tokens"] for e in ext],
            "later_steps_mean_ms": {"agent": round(a_ms), "external": round(e_ms)},
            "ratio_agent_over_external": round(a_ms / e_ms, 3) if e_ms else None,
        }))
    finally:
        a.kill()
        b.kill()
        tools.shutdown()


if __name__ == "__main__":
    main()
