#!/usr/bin/env bash
# The API fuzz suite (issue 14): one real `kiln serve` on the default model with the embedding
# model (so every route is live: chat, completions, responses, embeddings, agents, runs, memory),
# then tests/fuzz/fuzz.py sends >= 5,000 Schemathesis cases generated from the server's own
# /openapi.json and checks: no 5xx, no answer slower than 30 s, OpenAI's error body on every 4xx,
# /health answering throughout and 200 afterwards. Always stops the server. Exit code = fuzz.py's.
#
# The context is capped (--max-model-len 256) so a valid generation case ends in seconds on a
# CPU: the fuzz looks for crashes, stalls and malformed errors, not for long answers.
#
# Env: KILN_FUZZ_VENV (default ~/.cache/kiln-fuzz-venv), PYTHON (python3), KILN_BIN (skip the
#      build), KILN_MODELS_DIR, and fuzz.py's own (KILN_FUZZ_POSITIVE, _NEGATIVE, _WORKERS, _SEED).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
log() { echo "tests/fuzz: $*" >&2; }

PY=${PYTHON:-python3}
VENV=${KILN_FUZZ_VENV:-$HOME/.cache/kiln-fuzz-venv}
stamp="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.kiln-stamp" 2>/dev/null)" != "$stamp" ]; then
  log "creating the venv in $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" >&2
  echo "$stamp" > "$VENV/.kiln-stamp"
fi

if [ -z "${KILN_BIN:-}" ]; then
  log "building kiln (release)"
  "${CARGO:-cargo}" build --release --quiet -p kiln-server >&2
  KILN_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln"
fi
MODELS=${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}
MODEL_FILE="$MODELS/smollm2-135m-instruct-q4_1.gguf"
EMBED_DIR="$MODELS/all-minilm-l6-v2"
[ -f "$MODEL_FILE" ] && [ -f "$EMBED_DIR/model.safetensors" ] || scripts/fetch-models.sh default embed

LOGS="$ROOT/target/kiln-fuzz"
rm -rf "$LOGS" && mkdir -p "$LOGS"
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Settings from the caller's shell (an API key, a config file) would change what is fuzzed.
clean_env=()
while IFS='=' read -r name _; do
  case "$name" in KILN_LOG | KILN_MODELS_DIR | KILN_FUZZ_*) ;; KILN_*) clean_env+=(-u "$name") ;; esac
done < <(env)
env "${clean_env[@]}" "$KILN_BIN" serve --model "$MODEL_FILE" --embedding-model "$EMBED_DIR" --host 127.0.0.1 \
  --port "$PORT" --max-model-len 256 --kv-cache-memory 512M --data-dir "$LOGS/data" \
  >"$LOGS/kiln.out" 2>"$LOGS/kiln.log" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1500); do
  kill -0 "$pid" 2>/dev/null || { tail -n 30 "$LOGS/kiln.log" >&2; log "kiln exited before it was healthy"; exit 1; }
  "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$PORT/health" 2>/dev/null && break
  sleep 0.2
done
log "kiln up on port $PORT (log: $LOGS/kiln.log)"
status=0
PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" "$HERE/fuzz.py" "http://127.0.0.1:$PORT" || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  log "kiln died during the fuzz"
  status=1
fi
[ "$status" = 0 ] || tail -n 40 "$LOGS/kiln.log" >&2
exit "$status"
