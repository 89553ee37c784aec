#!/usr/bin/env bash
# The test command: fetches the models the tests need (SmolLM2 + MiniLM, cached), then runs the
# whole test suite. Set KILN_TEST_FULL=1 to also fetch the optional tier (Qwen2.5) so its tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
sets="default embed"
[ "${KILN_TEST_FULL:-0}" = 1 ] && sets="$sets qwen"
scripts/fetch-models.sh $sets
# House rules first: formatted, and clippy-clean (warnings are errors).
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast "$@"
