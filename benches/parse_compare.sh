#!/usr/bin/env bash
# Sampled structured output, kiln vs llama-server (issue 10 item 6): the same 25 seeded
# `chat.completions.parse` calls at temperature 1.0 (benches/parse_bench.py) against `kiln serve`
# and llama-server on the same GGUF, each with its default sampling (kiln as scripts/run.sh serves
# the default model: top_k 40, top_p 0.95, min_p 0.05, repetition_penalty 1.1; then without the
# penalty; then `--default-sampling none`, OpenAI's neutral sampling; llama-server: its built-in
# top_k 40, top_p 0.95, min_p 0.05), to show what the defaults do.
# llama-server comes from ../shared/peers/build-llama-cpp.sh (built once, cached); without it
# only kiln runs. Prints one JSON line per server.
#
# Usage: benches/parse_compare.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct Q4_1)
# Env: KILN_BIN (skip the build), LLAMA_BIN_DIR (skip the llama.cpp build), NO_LLAMA=1,
#      SEEDS (5 per model: 25 samples), PORT (18190), KILN_BENCH_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-18190}
scripts/fetch-models.sh default >&2
MODEL=${1:-$HOME/.cache/kiln/models/smollm2-135m-instruct-q4_1.gguf}
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-server
  KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
VENV=${KILN_BENCH_VENV:-$HOME/.cache/kiln-peers/venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import openai, pydantic" 2>/dev/null || "$VENV/bin/pip" install -q openai pydantic

pid=
stop() { [ -z "$pid" ] || { kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }; }
trap stop EXIT
up() { # port
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.2; done
  echo "server on port $1 did not come up" >&2; return 1
}

# The default model as scripts/run.sh serves it, then llama.cpp's fallback alone, then none.
for flags in "--default-sampling repetition_penalty=1.1" "" "--default-sampling none"; do
  # shellcheck disable=SC2086 # flags are words
  "$KILN_BIN" serve --model "$MODEL" --served-model-name default --host 127.0.0.1 --port "$PORT" $flags \
    >/dev/null 2>target/parse-compare-kiln.log &
  pid=$!
  up "$PORT"
  "$VENV/bin/python" benches/parse_bench.py "kiln${flags:+ ${flags//=/:}}=http://127.0.0.1:$PORT/v1@default"
  stop
done

[ "${NO_LLAMA:-0}" = 1 ] && exit 0
BIN=${LLAMA_BIN_DIR:-$(../shared/peers/build-llama-cpp.sh)}
"$BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -c 4096 --jinja >/dev/null \
  2>target/parse-compare-llama.log &
pid=$!
up "$PORT"
"$VENV/bin/python" benches/parse_bench.py "llama-server=http://127.0.0.1:$PORT/v1@default"
