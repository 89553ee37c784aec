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
# The default model's sampling defaults (README, "Default sampling"): llama.cpp's top-k/top-p/min-p
# plus repetition_penalty 1.1, under which sampled JSON from SmolLM2-135M parses 99/100 times at
# temperature 1 (89/100 without the penalty; benches/parse_compare.sh). Not when the caller chose a model, a config file
# or defaults of their own.
if [ -z "${KILN_MODEL:-}${KILN_CONFIG:-}${KILN_DEFAULT_SAMPLING:-}" ] && [[ " $* " != *" --config"* && " $* " != *" --default-sampling"* ]]; then
  export KILN_DEFAULT_SAMPLING="repetition_penalty=1.1"
fi
export KILN_MODEL="$MODEL"
exec "${CARGO_TARGET_DIR:-target}/release/kiln" "$@"
