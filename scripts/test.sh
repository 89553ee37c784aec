#!/usr/bin/env bash
# The test command: fetches the models the tests need (SmolLM2 + MiniLM, cached) and installs the
# MCP servers the agent tests use (scripts/mcp-servers.sh, cached), then runs the
# whole test suite. Set KILN_TEST_FULL=1 to also fetch the optional tier (Qwen2.5) so its tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
sets="default embed"
[ "${KILN_TEST_FULL:-0}" = 1 ] && sets="$sets qwen"
scripts/fetch-models.sh $sets
# The real MCP servers the agent tests talk to (PyPI mcp-server-time, npm server-everything), cached.
scripts/mcp-servers.sh
# House rules first: formatted, and clippy-clean (warnings are errors).
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The run store's tests also run on a real Postgres: a throwaway cluster (stopped and removed when
# this script exits) unless KILN_TEST_DATABASE_URL is already set. KILN_TEST_POSTGRES=0 opts out;
# the Postgres tests then print SKIP.
if [ -z "${KILN_TEST_DATABASE_URL:-}" ] && [ "${KILN_TEST_POSTGRES:-1}" != 0 ]; then
    # shellcheck source=scripts/postgres.sh
    source scripts/postgres.sh
fi
cargo test --workspace --no-fail-fast "$@"
