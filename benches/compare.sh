#!/usr/bin/env bash
# Side-by-side throughput of kiln and llama.cpp on the same model, machine and run (machines are
# noisy: only ratios from one run mean anything). Sequential, never two engines at once.
#
#   kiln bench            prefill 512, decode batch 1, aggregate decode at 4/8/16, peak RSS
#   llama-bench           pp512 and tg128 (-t $THREADS)
#   llama-server + load.py  aggregate tokens/s, TTFT and e2e latency at each concurrency
#   kiln serve  + load.py   the same, when the binary has `serve`
#
# Usage: benches/compare.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct Q4_1, fetched)
# Env: THREADS (2), CONCURRENCY ("1 4 8 16"), GEN (128), OUT (target/bench-compare.json)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
CONCURRENCY=${CONCURRENCY:-"1 4 8 16"}
GEN=${GEN:-128}
OUT=${OUT:-target/bench-compare.json}
PORT=${PORT:-18089}

scripts/fetch-models.sh default >&2
MODEL=${1:-$HOME/.cache/kiln/models/smollm2-135m-instruct-q4_1.gguf}
cargo build --release -q -p kiln-server
KILN=${CARGO_TARGET_DIR:-target}/release/kiln
LLAMA_BIN=$(/work/shared/peers/build-llama-cpp.sh 2>/dev/null || ../shared/peers/build-llama-cpp.sh)
export LD_LIBRARY_PATH="$LLAMA_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
VENV=${KILN_BENCH_VENV:-$HOME/.cache/kiln-peers/venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import httpx" 2>/dev/null || "$VENV/bin/pip" install -q httpx
LOAD_PY=$(ls /work/shared/bench/load.py ../shared/bench/load.py 2>/dev/null | head -1)
results=$(mktemp)

echo "== kiln bench" >&2
RAYON_NUM_THREADS=$THREADS $KILN bench --model "$MODEL" --gen-tokens "$GEN" | tail -1 >>"$results"

echo "== llama-bench" >&2
"$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n "$GEN" -o json 2>/dev/null |
  python3 -c 'import json,sys; print(json.dumps({"engine":"llama-bench","runs":[{"n_prompt":r["n_prompt"],"n_gen":r["n_gen"],"avg_ts":r["avg_ts"]} for r in json.load(sys.stdin)]}))' >>"$results"

wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 0.1; done; return 1; }
rss_of() { awk '/VmHWM/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo null; }
serve_load() { # name pid
  local name=$1 pid=$2
  wait_up || { echo "$name did not come up" >&2; kill "$pid"; return 1; }
  "$VENV/bin/python" "$LOAD_PY" --base-url "http://127.0.0.1:$PORT" -c 1 --max-tokens 8 --ignore-eos >/dev/null # warm-up
  for c in $CONCURRENCY; do
    line=$("$VENV/bin/python" "$LOAD_PY" --base-url "http://127.0.0.1:$PORT" --model default -c "$c" -n $((c * 2)) \
      --max-tokens "$GEN" --prompt-tokens 100 --ignore-eos)
    echo "{\"engine\":\"$name\",\"concurrency\":$c,\"peak_rss_bytes\":$(rss_of "$pid"),\"load\":$line}" >>"$results"
  done
  # Every KV block must be free again once the load is over (kiln only: llama-server has no such gauge).
  curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^kiln:kv_blocks_used' >&2 || true
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
}

echo "== llama-server" >&2
"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" -np 16 -c 16384 --port "$PORT" >/dev/null 2>&1 &
serve_load llama-server $!

if $KILN --help | grep -q '^  serve'; then
  echo "== kiln serve" >&2
  RAYON_NUM_THREADS=$THREADS $KILN serve --model "$MODEL" --served-model-name default --port "$PORT" >/dev/null 2>&1 &
  serve_load kiln-serve $!
fi

mkdir -p "$(dirname "$OUT")" && cp "$results" "$OUT"
python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
kiln = next(r for r in rows if r["engine"] == "kiln")
lb = {(r["n_prompt"], r["n_gen"]): r["avg_ts"] for r in next(r for r in rows if r["engine"] == "llama-bench")["runs"]}
pp, tg = lb.get((512, 0)), next((v for (p, g), v in lb.items() if p == 0 and g > 0), None)
print(f"{'metric':<40}{'kiln':>10}{'llama.cpp':>11}{'ratio':>8}")
def row(name, k, l):
    print(f"{name:<40}{k:>10.1f}{l:>11.1f}{k / l:>8.2f}" if l else f"{name:<40}{k:>10.1f}{'-':>11}")
row("prefill 512 tok/s (llama-bench pp512)", kiln["prefill_tok_s"], pp)
row("decode batch 1 tok/s (tg128)", kiln["decode_tok_s"], tg)
srv = {r["concurrency"]: r for r in rows if r["engine"] == "llama-server"}
ks = {r["concurrency"]: r for r in rows if r["engine"] == "kiln-serve"}
for a in kiln["aggregate"]:
    c = a["concurrency"]
    row(f"agg decode @{c} tok/s (llama-server)", a["agg_gen_tok_s"], srv.get(c, {}).get("load", {}).get("agg_gen_tok_s"))
print(f"kiln bench peak RSS: {kiln['peak_rss_bytes'] / 2**20:.0f} MiB")
for c in sorted(set(srv) | set(ks)):
    for name, d in (("llama-server", srv), ("kiln serve", ks)):
        if c in d:
            l = d[c]["load"]
            rss = d[c]["peak_rss_bytes"]
            print(f"HTTP {name:<12} c={c:<3} agg {l['agg_gen_tok_s']:7.1f} tok/s  TTFT p50 {l.get('ttft_p50_s') or 0:.3f}s p95 {l.get('ttft_p95_s') or 0:.3f}s  e2e p95 {l.get('e2e_p95_s') or 0:.2f}s  RSS {rss / 2**20:.0f} MiB")
EOF
