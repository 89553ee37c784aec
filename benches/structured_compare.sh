#!/usr/bin/env bash
# What constrained decoding (response_format json_schema) costs on kiln (issue 5): builds the
# release binary, starts `kiln serve` on SmolLM2-135M-Instruct, runs benches/structured_bench.py
# against it (batch-1 per-token latency constrained vs not; aggregate tok/s at 16 concurrent with
# half of them constrained; grammar compile time) and stops the server. Machines are noisy: only
# ratios from one run mean anything.
#
# Usage: benches/structured_compare.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct Q4_1, fetched)
# Env: THREADS (2), RUNS (5), GEN (128), CONCURRENCY (16), PORT (18090),
#      OUT (target/bench-structured.json), KILN_BIN (skip the build), KILN_BENCH_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
RUNS=${RUNS:-5}
GEN=${GEN:-128}
CONCURRENCY=${CONCURRENCY:-16}
PORT=${PORT:-18090}
OUT=${OUT:-target/bench-structured.json}

scripts/fetch-models.sh default >&2
MODEL=${1:-$HOME/.cache/kiln/models/smollm2-135m-instruct-q4_1.gguf}
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-server
  KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
VENV=${KILN_BENCH_VENV:-$HOME/.cache/kiln-peers/venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import httpx" 2>/dev/null || "$VENV/bin/pip" install -q httpx

RAYON_NUM_THREADS=$THREADS "$KILN_BIN" serve --model "$MODEL" --served-model-name default --host 127.0.0.1 --port "$PORT" \
  >/dev/null 2>target/bench-structured-server.log &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "kiln did not come up; see target/bench-structured-server.log" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")"
"$VENV/bin/python" benches/structured_bench.py --base-url "http://127.0.0.1:$PORT" --model default \
  --runs "$RUNS" --max-tokens "$GEN" -c "$CONCURRENCY" --out "$OUT"
# Every KV block must be free again once the load is over.
curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^kiln:kv_blocks_used' >&2 || true
