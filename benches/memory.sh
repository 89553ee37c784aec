#!/usr/bin/env bash
# Issue 12's speed bars for the memory store, embedded backend, measured in one run (only ratios
# and same-run figures mean anything; run it on an otherwise idle machine):
#
#  1. Adding 1,000 short memories in one batch, memories/s, against the raw embedding throughput
#     of the same engine driven as `kiln embed-bench --batch 32` does, on fresh texts of the same
#     kind (medians of 3 alternating rounds). Bar: ratio >= 0.8.
#  2. Search latency one query at a time, embedding included, with MEMORIES memories in the store:
#     p50/p95/max for dense, hybrid and keyword search. Bar: dense p95 <= 10 ms.
#  3. Reopening the store at that size (drop, open, list one). Bar: < 2 s.
#
# Usage: benches/memory.sh   Env: MEMORIES (100000), QUERIES (200), KILN_BIN (skip the build).
# Prints the JSON line of `kiln memory-bench` (and a readable copy on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh embed >&2
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-server
  KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
"$KILN_BIN" memory-bench --model "${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}/all-minilm-l6-v2" \
  --memories "${MEMORIES:-100000}" --queries "${QUERIES:-200}"
