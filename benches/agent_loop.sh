#!/usr/bin/env bash
# Issue 11's per-step cost benchmark: a server-side agent's tool loop (sessions: each step
# prefills only what was added) against the same conversation driven step by step by an external
# client over /v1/chat/completions on a server with --no-prefix-caching. One JSON line; only the
# ratio from one run means anything on a shared machine.
#
# Usage: benches/agent_loop.sh [MODEL.gguf]   (default: Qwen2.5-Coder-0.5B, fetched if missing)
# Env: KILN_BIN (skip the build), THREADS (2), STEPS (6).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS_DIR=${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}
model=${1:-$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
[ -f "$model" ] || scripts/fetch-models.sh qwen >&2
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-server
  KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
RAYON_NUM_THREADS=${THREADS:-2} python3 benches/agent_loop.py "$KILN_BIN" "$model"
