"""Peers of `kiln embed-bench` for benches/embed_compare.sh, on the same model and texts.

  corpus OUT_DIR                      write short.json (~12 words) and long.json (~128 words)
  st MODEL_DIR TEXTS.json BATCH SECS  sentence-transformers (PyTorch, CPU)
  ort MODEL_DIR TEXTS.json BATCH SECS onnxruntime on a torch.onnx export of the same weights,
                                      tokenization + mean pooling + L2 norm as sentence-transformers
  check MODEL_DIR TEXTS.json          cosine of ort vs st (the export is the same model)

Each benchmark prints one JSON line like kiln's: sentences/s, tokens/s, batch latency. Threads
come from OMP_NUM_THREADS / THREADS (default 2). Timing covers tokenization through normalized
vectors, as `kiln embed-bench` does.
"""

import json
import os
import random
import sys
import time

THREADS = int(os.environ.get("THREADS", "2"))

WORDS = """the of and to in is was that for on with as by at from his her they this have are
were been has had which an not but one all their there when would who will more if no out so
said what up its about into than them can only other new some could time these two may then do
first any my now such like our over man me even most made after also did many before must
through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long here get both between life being
under never day same another know while last might us great old year off come since against go
came right used take three states himself few house use during without again place around
however home small found thought went say part once general high upon school every does got
united left number course war until always away something fact though water less public put
think almost hand enough far took head yet government system better set told nothing night end
why called didn find look going asked later knew point next program city business give group
toward young days let room president side social given present several order national second
possible rather per face among form important often things looked early white case become large
need big four within felt along children saw best church ever least power development light
thing seemed family interest want members mind country area others done turned although open
problem god service certain kind different thus began door help sense whole matter perhaps
itself york times law human line above name example action company hands local show whether five
history gave today either act feet across taken past quite anything seen having death experience
body word half really week free car river garden train music market letter morning evening""".split()


def corpus(out_dir):
    rng = random.Random(20261123)
    os.makedirs(out_dir, exist_ok=True)
    for name, words, count in (("short", 12, 32 * 16), ("long", 128, 32 * 4)):
        texts = []
        for _ in range(count):
            n = max(1, words + rng.randint(-2, 2))
            s = " ".join(rng.choice(WORDS) for _ in range(n))
            texts.append(s[0].upper() + s[1:] + ".")
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(texts, f)


def timed(label, engine, texts, batch, secs, embed, count_tokens):
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    for b in batches[:2]:
        embed(b)  # warm-up
    lat, sentences, tokens = [], 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < secs or len(lat) < 3:
        b = batches[len(lat) % len(batches)]
        t = time.perf_counter()
        embed(b)
        lat.append(time.perf_counter() - t)
        sentences += len(b)
        tokens += count_tokens(b)
    el = time.perf_counter() - t0
    lat.sort()
    pct = lambda p: lat[round((len(lat) - 1) * p)]
    print(f"{engine} {label}: {sentences / el:.1f} sentences/s", file=sys.stderr)
    print(json.dumps({"engine": engine, "label": label, "batch": batch, "sentences_per_s": sentences / el,
                      "tokens_per_s": tokens / el, "batch_ms_p50": pct(0.5) * 1e3, "batch_ms_p95": pct(0.95) * 1e3}))


def load_st(model_dir):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    return SentenceTransformer(model_dir, device="cpu")


def token_counter(tok, max_len):
    return lambda b: sum(len(x) for x in tok(b, truncation=True, max_length=max_len)["input_ids"])


def export_onnx(model_dir, path):
    """The same weights as sentence-transformers' transformer module, exported with torch.onnx."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    ids = torch.ones(2, 16, dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    with torch.no_grad():
        try:
            torch.onnx.export(model, args, path, input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        except Exception as e:  # the TorchScript exporter may be gone: use the dynamo one
            print(f"legacy export failed ({e}); using dynamo", file=sys.stderr)
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
            shapes = {n: {0: b, 1: s} for n in names}
            torch.onnx.export(model, args, path, input_names=names, output_names=["last_hidden_state"],
                              dynamic_shapes=shapes, dynamo=True)


def load_ort(model_dir):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    cache = os.environ.get("ONNX_CACHE", os.path.expanduser("~/.cache/kiln-peers/onnx"))
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, os.path.basename(os.path.normpath(model_dir)) + ".onnx")
    if not os.path.exists(path):
        export_onnx(model_dir, path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    max_len = json.load(open(os.path.join(model_dir, "sentence_bert_config.json")))["max_seq_length"]

    def embed(texts):
        enc = tok([t.strip() for t in texts], padding=True, truncation=True, max_length=max_len, return_tensors="np")
        feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
                "token_type_ids": enc["token_type_ids"].astype(np.int64)}
        h = sess.run(None, feed)[0]
        m = enc["attention_mask"][..., None].astype(np.float32)
        v = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        return v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)

    return embed, tok, max_len


def main():
    cmd = sys.argv[1]
    if cmd == "corpus":
        return corpus(sys.argv[2])
    model_dir, texts = sys.argv[2], json.load(open(sys.argv[3]))
    label = os.path.splitext(os.path.basename(sys.argv[3]))[0]
    if cmd == "st":
        m = load_st(model_dir)
        batch, secs = int(sys.argv[4]), float(sys.argv[5])
        count = token_counter(m.tokenizer, m.max_seq_length)
        timed(label, "sentence-transformers", texts, batch, secs, lambda b: m.encode(b, batch_size=batch), count)
    elif cmd == "ort":
        embed, tok, max_len = load_ort(model_dir)
        batch, secs = int(sys.argv[4]), float(sys.argv[5])
        timed(label, "onnxruntime", texts, batch, secs, embed, token_counter(tok, max_len))
    elif cmd == "http":
        # model_dir is the server's base URL here; requests as the OpenAI SDK sends them (base64).
        import base64
        import urllib.request

        import numpy as np

        base_url, batch, secs = model_dir, int(sys.argv[4]), float(sys.argv[5])
        used = {}

        def embed(b):
            body = json.dumps({"model": "all-minilm-l6-v2", "input": b, "encoding_format": "base64"}).encode()
            req = urllib.request.Request(f"{base_url}/embeddings", body, {"Content-Type": "application/json"})
            r = json.load(urllib.request.urlopen(req))
            used["tokens"] = r["usage"]["total_tokens"]
            return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r["data"]]

        timed(label, "kiln-http", texts, batch, secs, embed, lambda b: used.get("tokens", 0))
    elif cmd == "check":
        import numpy as np

        embed, _, _ = load_ort(model_dir)
        st = load_st(model_dir).encode(texts[:32], batch_size=32)
        cos = (embed(texts[:32]) * st).sum(1)
        print(f"ort vs sentence-transformers: min cosine {cos.min():.7f}", file=sys.stderr)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
