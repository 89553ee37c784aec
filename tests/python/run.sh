#!/usr/bin/env bash
# The OpenAI-SDK conformance suite: builds `kiln`, starts two real `kiln serve` processes on the
# default model (one open, one with --api-key), plus a third on Qwen2.5-Coder-0.5B-Instruct when
# it is fetched (`scripts/fetch-models.sh qwen`; the tool-calling tests that need it skip
# otherwise), waits for /health, runs pytest against them with the official `openai` package, and
# always stops the servers. Exit code = pytest's.
#
# With the Qwen server up it then runs tests/python/frameworks/ (the OpenAI Agents SDK, Pydantic AI,
# LangChain against the Responses and Chat APIs) in a second venv, KILN_FRAMEWORKS_VENV (default
# ~/.cache/kiln-test-venv-frameworks): their `openai` pin moves faster than the main suite's.
#
# Env: KILN_TEST_VENV (default ~/.cache/kiln-test-venv), PYTHON (default python3),
#      KILN_BIN (skip the build, use this binary), KILN_MODELS_DIR. Arguments go to pytest
#      (e.g. `tests/python/run.sh -k stream -x`).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
log() { echo "tests/python: $*" >&2; }

# 1. The venvs: created once, reinstalled only when their requirements or the Python change.
PY=${PYTHON:-python3}
make_venv() { # dir requirements-file
  local venv=$1 req=$2 stamp
  stamp="$(sha256sum "$req" | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.kiln-stamp" 2>/dev/null)" != "$stamp" ]; then
    log "creating the venv in $venv"
    rm -rf "$venv"
    "$PY" -m venv "$venv" && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2 &&
      echo "$stamp" > "$venv/.kiln-stamp"
  fi
}
VENV=${KILN_TEST_VENV:-$HOME/.cache/kiln-test-venv}
make_venv "$VENV" "$HERE/requirements.txt"
VPY="$VENV/bin/python"

# 2. The binary and the model.
if [ -z "${KILN_BIN:-}" ]; then
  log "building kiln (release)"
  "${CARGO:-cargo}" build --release --quiet -p kiln-server >&2
  KILN_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln"
fi
MODELS=${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}
MODEL_FILE="$MODELS/smollm2-135m-instruct-q4_1.gguf"
EMBED_DIR="$MODELS/all-minilm-l6-v2"
QWEN_FILE="$MODELS/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
[ -f "$MODEL_FILE" ] && [ -f "$EMBED_DIR/model.safetensors" ] || scripts/fetch-models.sh default embed

# 3. Two (or three) servers on free ports. Their environment is cleared of KILN_* settings that would change
# them (an API key or config file from the caller's shell).
LOGS="$ROOT/target/kiln-python-tests"
mkdir -p "$LOGS"
API_KEY="kiln-test-key-$$"
free_port() { "$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
clean_env=()
while IFS='=' read -r name _; do
  case "$name" in KILN_LOG | KILN_MODELS_DIR) ;; KILN_*) clean_env+=(-u "$name") ;; esac
done < <(env)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_server() { # name port [args...]; SERVER_MODEL overrides the model file
  local name=$1 port=$2; shift 2
  # Each server its own fresh data dir (run store, memory): nothing from an earlier run or the
  # user's own ~/.local/share/kiln leaks into a test.
  rm -rf "$LOGS/$name-data"
  env "${clean_env[@]}" "$KILN_BIN" serve --model "${SERVER_MODEL:-$MODEL_FILE}" --host 127.0.0.1 --port "$port" \
    --kv-cache-memory "${SERVER_KV:-512M}" --data-dir "$LOGS/$name-data" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.log" &
  pids+=($!)
}
wait_healthy() { # name port pid
  "$VPY" - "$1" "$2" "$3" <<'PYEOF'
import os, sys, time, httpx
name, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"server {name} exited before it was healthy")
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
sys.exit(f"server {name} not healthy after 300 s")
PYEOF
}

PORT=$(free_port)
# The default model with its documented sampling defaults (scripts/run.sh, README).
start_server open "$PORT" --embedding-model "$EMBED_DIR" --default-sampling repetition_penalty=1.1
open_pid=${pids[-1]}
AUTH_PORT=$(free_port)
start_server auth "$AUTH_PORT" --api-key "other-key" --api-key "$API_KEY"
auth_pid=${pids[-1]}
qwen_env=()
if [ -f "$QWEN_FILE" ]; then
  QWEN_PORT=$(free_port)
  # With the embedding model too: test_vector_stores.py's file_search turn runs on it.
  SERVER_MODEL="$QWEN_FILE" SERVER_KV=1G start_server qwen "$QWEN_PORT" --embedding-model "$EMBED_DIR"
  qwen_pid=${pids[-1]}
  qwen_env=(KILN_QWEN_BASE_URL="http://127.0.0.1:$QWEN_PORT/v1" KILN_QWEN_MODEL="qwen2.5-coder-0.5b-instruct-q4_k_m")
else
  log "no $QWEN_FILE: the Qwen tool-calling tests skip (scripts/fetch-models.sh qwen)"
fi
if ! wait_healthy open "$PORT" "$open_pid" || ! wait_healthy auth "$AUTH_PORT" "$auth_pid" ||
  { [ -n "${qwen_pid:-}" ] && ! wait_healthy qwen "$QWEN_PORT" "$qwen_pid"; }; then
  tail -n 30 "$LOGS"/*.log >&2
  exit 1
fi
log "servers up on ports $PORT (open), $AUTH_PORT (--api-key)${QWEN_PORT:+ and $QWEN_PORT (Qwen)}; logs in $LOGS"

# 4. The suite.
status=0
env "${qwen_env[@]}" KILN_BASE_URL="http://127.0.0.1:$PORT/v1" KILN_AUTH_BASE_URL="http://127.0.0.1:$AUTH_PORT/v1" \
  KILN_API_KEY="$API_KEY" KILN_MODEL="smollm2-135m-instruct-q4_1" PYTHONDONTWRITEBYTECODE=1 \
  "$VPY" -m pytest -p no:cacheprovider -q -rf --durations=5 --ignore="$HERE/frameworks" "$HERE" "$@" || status=$?
if [ -n "${qwen_pid:-}" ]; then
  FW_VENV=${KILN_FRAMEWORKS_VENV:-$HOME/.cache/kiln-test-venv-frameworks}
  if make_venv "$FW_VENV" "$HERE/frameworks/requirements.txt"; then
    env "${qwen_env[@]}" PYTHONDONTWRITEBYTECODE=1 "$FW_VENV/bin/python" -m pytest -p no:cacheprovider -q -rf \
      --rootdir "$HERE/frameworks" "$HERE/frameworks" "$@" || { fw=$?; [ "$fw" = 5 ] || status=$fw; } # 5: none selected
  else
    log "SKIP: the frameworks venv could not be installed; tests/python/frameworks did not run"
  fi
fi
for p in "${pids[@]}"; do
  kill -0 "$p" 2>/dev/null || { log "a server died during the suite"; status=1; }
done
if [ "$status" != 0 ]; then
  log "server log tails:"
  tail -n 40 "$LOGS"/*.log >&2
fi
exit "$status"
