"""Soak: one `kiln serve` under DURATION seconds of CONCURRENCY clients (chat, streamed chat that
disconnects part-way, completions, embeddings), sampling the server's RSS and KV blocks in use.

Prints one JSON line: requests and errors by kind, RSS samples, the RSS spread over the last
WINDOW seconds (issue 14's bar: within 10%), and KV blocks in use once the load stops (bar: 0).
An error is any response that is not 2xx, or 429 with no Retry-After; a client's own disconnect
is not an error. Usage: benches/soak.sh (builds kiln, fetches the default models).
"""

import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request

DURATION = int(os.environ.get("DURATION", "1800"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "16"))
WINDOW = int(os.environ.get("WINDOW", str(min(1200, DURATION * 2 // 3))))
SAMPLE_EVERY = float(os.environ.get("SAMPLE_EVERY", "10"))
PORT = int(os.environ.get("PORT", "18977"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(name):
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            # `name{labels} value` (or `name value`)
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}

    def add(self, kind, outcome):
        with self.lock:
            k = self.counts.setdefault(kind, {})
            k[outcome] = k.get(outcome, 0) + 1


def request(kind, body, stream_cut=None):
    """One request; returns 'ok', 'disconnected' or 'error:<status>'."""
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=300)
    path = {"chat": "/v1/chat/completions", "stream": "/v1/chat/completions", "completion": "/v1/completions",
            "embed": "/v1/embeddings"}[kind]
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status == 429 and r.getheader("Retry-After"):
            r.read()
            return "throttled"
        if r.status // 100 != 2:
            r.read()
            return f"error:{r.status}"
        if stream_cut is not None:
            for _ in range(stream_cut):
                if not r.readline():
                    break
            conn.sock.close()  # the client leaves mid-stream
            return "disconnected"
        r.read()
        return "ok"
    except OSError as e:
        return f"error:{type(e).__name__}"
    finally:
        conn.close()


def client(model, embed_model, stop, stats, seed):
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choice(["chat", "stream", "completion", "embed"] if embed_model else ["chat", "stream", "completion"])
        words = " ".join(rng.choice(["kiln", "fire", "clay", "glaze", "heat", "pot"]) for _ in range(rng.randint(5, 400)))
        if kind == "embed":
            body = {"model": embed_model, "input": [words] * rng.randint(1, 8)}
        elif kind == "completion":
            body = {"model": model, "prompt": words, "max_tokens": rng.randint(1, 64), "seed": rng.randint(0, 9999)}
        else:
            body = {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": rng.randint(1, 96),
                    "stream": kind == "stream", "seed": rng.randint(0, 9999)}
        cut = rng.randint(1, 20) if kind == "stream" and rng.random() < 0.5 else None
        stats.add(kind, request(kind, body, cut))


def main():
    kiln, model_file, embed_dir = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
    args = [kiln, "serve", "--model", model_file, "--served-model-name", "m", "--port", str(PORT),
            "--data-dir", os.environ.get("SOAK_DATA_DIR", f"/tmp/kiln-soak-{os.getpid()}")]
    if embed_dir:
        args += ["--embedding-model", embed_dir]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1500):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        else:
            sys.exit("kiln did not start")
        embed_model = os.path.basename(embed_dir.rstrip("/")) if embed_dir else None
        stop, stats, samples = threading.Event(), Stats(), []
        threads = [threading.Thread(target=client, args=("m", embed_model, stop, stats, i), daemon=True)
                   for i in range(CONCURRENCY)]
        start = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - start < DURATION:
            time.sleep(SAMPLE_EVERY)
            samples.append({"t": round(time.monotonic() - start), "rss_mib": round(rss_kib(server.pid) / 1024, 1),
                            "kv_blocks_used": metric("kiln:kv_blocks_used")})
        stop.set()
        for t in threads:
            t.join(timeout=600)
        time.sleep(3)  # disconnected sequences are reaped within ~1.5 s
        window = [s["rss_mib"] for s in samples if s["t"] >= DURATION - WINDOW]
        spread = (max(window) - min(window)) / min(window) if window else None
        errors = sum(n for k in stats.counts.values() for o, n in k.items() if o.startswith("error"))
        health = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=5).status
        print(json.dumps({
            "duration_s": DURATION, "concurrency": CONCURRENCY, "requests": stats.counts, "errors": errors,
            "rss_window_s": WINDOW, "rss_spread_in_window": round(spread, 4) if spread is not None else None,
            "kv_blocks_used_at_end": metric("kiln:kv_blocks_used"), "health_at_end": health,
            "samples": samples,
        }))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
