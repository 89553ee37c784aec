#!/usr/bin/env bash
# Issue 14's soak benchmark (not a test: it runs for 30 minutes): `kiln serve` on the default
# model with the embedding model, 16 concurrent clients with mid-stream disconnects, RSS and KV
# blocks sampled every 10 s. One JSON line; the bar: errors 0, RSS spread <= 10% over the last
# 20 minutes, kv_blocks_used_at_end 0.
#
# Usage: benches/soak.sh   Env: KILN_BIN (skip the build), DURATION (1800), CONCURRENCY (16),
# WINDOW (1200), SAMPLE_EVERY (10), PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS_DIR=${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}
model=$MODELS_DIR/smollm2-135m-instruct-q4_1.gguf
embed=$MODELS_DIR/all-minilm-l6-v2
[ -f "$model" ] && [ -f "$embed/model.safetensors" ] || scripts/fetch-models.sh default embed >&2
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-server
  KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
python3 benches/soak.py "$KILN_BIN" "$model" "$embed"
