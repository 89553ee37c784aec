#!/usr/bin/env bash
# Installs the real MCP servers the agent tests talk to, pinned and cached; idempotent (a rerun
# with everything in place does nothing but check two marker files).
#
#   PyPI mcp-server-time         -> $KILN_MCP_DIR/time-py     (run: PYTHONPATH=... python3 -m mcp_server_time)
#   npm  server-everything       -> $KILN_MCP_DIR/everything  (run: node .../dist/index.js [stdio|streamableHttp])
#
# Cache: $KILN_MCP_DIR (default ~/.cache/kiln/mcp). The tests look there (or in $KILN_MCP_DIR) and
# print SKIP when a server is missing, so this script must run before `cargo test` in CI.
set -euo pipefail
DIR=${KILN_MCP_DIR:-$HOME/.cache/kiln/mcp}
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore  # CI runs as root; pip only warns, and --target keeps it out of site-packages
TIME_VER=2026.10.19
EVERYTHING_VER=2026.8.31
mkdir -p "$DIR"

log() { echo "mcp-servers: $*" >&2; }

install_time() {
  local dest="$DIR/time-py" mark="$DIR/time-py/.kiln-$TIME_VER"
  [ -f "$mark" ] && return 0
  log "mcp-server-time==$TIME_VER from PyPI"
  # --target, not a venv: Debian's python3 may lack the venv module; the tests set PYTHONPATH.
  rm -rf "$dest.part"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --target "$dest.part" "mcp-server-time==$TIME_VER" >&2
  rm -rf "$dest" && mv "$dest.part" "$dest" && touch "$mark"
}

ensure_node() {
  command -v node >/dev/null && command -v npm >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "node/npm missing: installing from Debian apt"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
  else
    log "node/npm missing and not root: the everything-server tests will SKIP"
    return 1
  fi
}

install_everything() {
  local dest="$DIR/everything" mark="$DIR/everything/.kiln-$EVERYTHING_VER"
  [ -f "$mark" ] && return 0
  ensure_node || return 0
  log "@modelcontextprotocol/server-everything@$EVERYTHING_VER from npm"
  rm -rf "$dest.part" && mkdir -p "$dest.part"
  npm install --silent --no-audit --no-fund --prefix "$dest.part" \
    "@modelcontextprotocol/server-everything@$EVERYTHING_VER" >&2
  rm -rf "$dest" && mv "$dest.part" "$dest" && touch "$mark"
}

install_time
install_everything
