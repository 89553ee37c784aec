#!/usr/bin/env bash
# Issue 14's fairness bars, measured in one run on one machine (only ratios mean anything):
#
#  1. `kiln bench-agent`'s fairness probe: a 2-token request sent a third into a ~4,000-token
#     prompt's prefill; its time to first token as a fraction of that prefill alone (bar <= 10%),
#     and how much the long prefill slowed (bar <= 20%).
#  2. What fair scheduling costs in throughput: `kiln serve` + load.py (the same closed loop as
#     benches/compare.sh) with the per-sequence prefill cap on (default) and off
#     (`--long-prefill-token-threshold 0`, the scheduler before it), at CONCURRENCY clients with
#     short (100) and long (1,000-token) prompts; ratio of aggregate tokens/s (bar: >= 0.95).
#
# Usage: benches/fairness.sh [MODEL.gguf]   Env: THREADS (2), CONCURRENCY (16), GEN (128),
# KILN_BIN (skip the build), PORT (18091). Needs ../shared/bench/load.py (as compare.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
CONCURRENCY=${CONCURRENCY:-16}
GEN=${GEN:-128}
PORT=${PORT:-18091}
scripts/fetch-models.sh default >&2
MODEL=${1:-$HOME/.cache/kiln/models/smollm2-135m-instruct-q4_1.gguf}
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-server
  KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
LOAD_PY=$(ls /work/shared/bench/load.py ../shared/bench/load.py 2>/dev/null | head -1)
[ -n "$LOAD_PY" ] || { echo "load.py not found (../shared/bench/load.py)" >&2; exit 1; }
VENV=${KILN_BENCH_VENV:-$HOME/.cache/kiln-peers/venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import httpx" 2>/dev/null || "$VENV/bin/pip" install -q httpx

echo "== kiln bench-agent (fairness probe)" >&2
fair=$(RAYON_NUM_THREADS=$THREADS "$KILN_BIN" bench-agent --model "$MODEL" --gen-tokens 16 --kv-cache-memory 1G |
  tail -1 | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["fairness"]))')

up() { for _ in $(seq 600); do "$VENV/bin/python" -c "import httpx,sys; httpx.get(sys.argv[1]).raise_for_status()" \
  "http://127.0.0.1:$PORT/health" 2>/dev/null && return 0; sleep 0.2; done; return 1; }
load() { # prompt-tokens [kiln serve args...] -> agg_gen_tok_s
  local prompt=$1; shift
  RAYON_NUM_THREADS=$THREADS "$KILN_BIN" serve --model "$MODEL" --served-model-name default --port "$PORT" "$@" \
    >/dev/null 2>&1 &
  local pid=$!
  up || { kill "$pid"; echo "kiln did not come up" >&2; return 1; }
  "$VENV/bin/python" "$LOAD_PY" --base-url "http://127.0.0.1:$PORT" --model default -c "$CONCURRENCY" \
    -n $((CONCURRENCY * 2)) --max-tokens "$GEN" --prompt-tokens "$prompt" --ignore-eos |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["agg_gen_tok_s"])'
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
}
rows=""
for prompt in 100 1000; do
  echo "== kiln serve, $prompt-token prompts, prefill cap on then off" >&2
  on=$(load "$prompt")
  off=$(load "$prompt" --long-prefill-token-threshold 0)
  rows="$rows{\"prompt_tokens\": $prompt, \"agg_tok_s_cap_on\": $on, \"agg_tok_s_cap_off\": $off, \"ratio\": $(python3 -c "print(round($on / $off, 3))")},"
done
echo "{\"fairness\": $fair, \"throughput\": [${rows%,}]}"
