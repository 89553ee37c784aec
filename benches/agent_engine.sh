#!/usr/bin/env bash
# What prefix caching, sessions and fork buy (issue 10's benchmarks), measured by
# `kiln bench-agent` in one process against the same model without them: turn-5 TTFT of a
# 5-turn chat over a ~2,000-token system prompt (cached vs not), a 6-step tool loop through a
# session vs whole uncached requests, and 4 forked children of a ~1,000-token prefix vs the 4
# prompts one after another. Prints one JSON line per model; only ratios from one run mean
# anything on a shared machine.
#
# Usage: benches/agent_engine.sh [MODEL.gguf ...]   (default: SmolLM2, plus Qwen2.5 if fetched)
# Env: THREADS (2), GEN (16), KILN_BIN (skip the build).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
GEN=${GEN:-16}
MODELS_DIR=${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}
scripts/fetch-models.sh default >&2
if [ $# -eq 0 ]; then
  set -- "$MODELS_DIR/smollm2-135m-instruct-q4_1.gguf"
  [ -f "$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" ] && set -- "$@" "$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
fi
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-server
  KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
for model in "$@"; do
  RAYON_NUM_THREADS=$THREADS "$KILN_BIN" bench-agent --model "$model" --gen-tokens "$GEN" --kv-cache-memory 1G
done
