#!/usr/bin/env bash
# Embedding throughput of kiln (in-process: `kiln embed-bench`) beside sentence-transformers
# (PyTorch) and onnxruntime (a torch.onnx export of the same weights), same model, same texts,
# same thread count, one run (machines are noisy: only ratios from one run mean anything).
# Engines run one at a time, alternating over ROUNDS rounds; the table shows each one's best
# round (the least disturbed by anything else on the machine).
#
#   texts: batches of 32 sentences of ~12 words and of ~128 words (benches/embed_peers.py corpus)
#   each engine: tokenization -> vectors (mean-pooled, L2-normalized), batch after batch
#   kiln runs twice: default precision (bf16 matmuls where the CPU has AVX-512 BF16) and f32
#
# Usage: benches/embed_compare.sh [MODEL_DIR]   (default: all-MiniLM-L6-v2, fetched)
# Env: THREADS (2), BATCH (32), SECONDS_EACH (5), ROUNDS (2), OUT (target/embed-compare.json),
#      KILN_EMBED_VENV (~/.cache/kiln-peers/venv-embed: sentence-transformers, onnxruntime)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
BATCH=${BATCH:-32}
SECONDS_EACH=${SECONDS_EACH:-5}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-target/embed-compare.json}

scripts/fetch-models.sh embed >&2
MODEL=${1:-$HOME/.cache/kiln/models/all-minilm-l6-v2}
cargo build --release -q -p kiln-server
KILN=${CARGO_TARGET_DIR:-target}/release/kiln
VENV=${KILN_EMBED_VENV:-$HOME/.cache/kiln-peers/venv-embed}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import sentence_transformers, onnxruntime, onnx, onnxscript" 2>/dev/null ||
  "$VENV/bin/pip" install -q sentence-transformers onnxruntime onnx onnxscript
PY="$VENV/bin/python"
PEERS=benches/embed_peers.py
TEXTS=target/embed-bench
"$PY" "$PEERS" corpus "$TEXTS"
export THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS
"$PY" "$PEERS" check "$MODEL" "$TEXTS/short.json" 2>&1 | grep -i cosine >&2 # exports the ONNX graph once
results=$(mktemp)
PORT=${PORT:-18091}
CHAT_MODEL=$HOME/.cache/kiln/models/smollm2-135m-instruct-q4_1.gguf
scripts/fetch-models.sh default >&2
$KILN serve --model "$CHAT_MODEL" --embedding-model "$MODEL" --served-embedding-model-name all-minilm-l6-v2 \
  --port "$PORT" --kv-cache-memory 64M >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
for round in $(seq "$ROUNDS"); do
  for set in short long; do
    echo "== round $round, $set" >&2
    $KILN embed-bench --model "$MODEL" --input "$TEXTS/$set.json" --batch "$BATCH" --seconds "$SECONDS_EACH" --label "$set" 2>/dev/null >>"$results"
    $KILN embed-bench --model "$MODEL" --input "$TEXTS/$set.json" --batch "$BATCH" --seconds "$SECONDS_EACH" --label "$set" --precision f32 2>/dev/null >>"$results"
    "$PY" "$PEERS" http "http://127.0.0.1:$PORT/v1" "$TEXTS/$set.json" "$BATCH" "$SECONDS_EACH" 2>/dev/null >>"$results"
    "$PY" "$PEERS" ort "$MODEL" "$TEXTS/$set.json" "$BATCH" "$SECONDS_EACH" 2>/dev/null >>"$results"
    "$PY" "$PEERS" st "$MODEL" "$TEXTS/$set.json" "$BATCH" "$SECONDS_EACH" 2>/dev/null >>"$results"
  done
done

mkdir -p "$(dirname "$OUT")" && cp "$results" "$OUT"
python3 - "$results" "$THREADS" "$BATCH" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
best = {}
for r in rows:
    k = (r["engine"], r["label"])
    if k not in best or r["sentences_per_s"] > best[k]["sentences_per_s"]:
        best[k] = r
engines = ["kiln", "kiln-f32", "kiln-http", "onnxruntime", "sentence-transformers"]
print(f"sentences/s, batches of {sys.argv[3]}, {sys.argv[2]} threads (best of {len(rows) // 10} rounds)")
print(f"{'texts':<12}" + "".join(f"{e:>23}" for e in engines) + f"{'kiln/ort':>10}{'http/in-proc':>14}")
for label, name in (("short", "~12 words"), ("long", "~128 words")):
    v = [best.get((e, label), {}).get("sentences_per_s") for e in engines]
    cells = "".join(f"{x:>23.1f}" if x else f"{'-':>23}" for x in v)
    ratio = f"{v[0] / v[3]:>10.2f}" if v[0] and v[3] else ""
    ratio += f"{v[2] / v[0]:>14.2f}" if v[0] and v[2] else ""
    print(f"{name:<12}{cells}{ratio}")
k = {r["label"]: r for r in rows if r["engine"] == "kiln"}
for label, r in sorted(k.items()):
    print(f"kiln {label}: {r['mean_tokens']:.1f} tokens/sentence, {r['tokens_per_s']:.0f} tokens/s, "
          f"batch p50 {r['batch_ms_p50']:.1f} ms p95 {r['batch_ms_p95']:.1f} ms, matmuls in {r['precision']}")
EOF
