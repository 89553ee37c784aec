#!/usr/bin/env bash
# The run command: fetches the default model (cached), builds kiln in release mode and runs it.
# With no arguments it serves the OpenAI API on http://127.0.0.1:8080/v1 (printing the base URL
# when ready), with all-MiniLM-L6-v2 on /v1/embeddings beside the chat model; otherwise the arguments go to `kiln` with `--model` defaulting to
# SmolLM2-135M-Instruct, e.g.:
#   scripts/run.sh generate --prompt "The capital of France is" --max-tokens 32
#   scripts/run.sh serve --port 9000 --api-key secret
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh default embed
MODEL=${KILN_MODEL:-${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}/smollm2-135m-instruct-q4_1.gguf}
cargo build --release --quiet --bin kiln
EMBED=${KILN_EMBEDDING_MODEL:-${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}/all-minilm-l6-v2}
[ $# -gt 0 ] || set -- serve --embedding-model "$EMBED"
export KILN_MODEL="$MODEL"
exec target/release/kiln "$@"
