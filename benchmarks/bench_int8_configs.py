"""Graph and int8 quantization choices for all-MiniLM-L6-v2: accuracy (cosine to fp32) and speed, one run.

python benchmarks/bench_int8_configs.py --data ../shared/data --sentences 1000 --passages 200

Encodes the same real texts (seed 2) through: the plain export, the fused graph (ORT transformer
optimizer), and dynamic int8 variants of the fused graph (per-channel QInt8 = what embfast ships; with
reduce_range; QUInt8 weights; MatMul only; and per-channel QInt8 excluding node groups). Reports seconds,
speed relative to the plain export, and min / mean cosine to the plain export. Length-sorted batches of 32.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--passages", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from embfast.batching import plan_batches
    from embfast.export import default_model_path, ensure_exported, read_manifest
    from embfast.kernels import l2_normalize, pool
    from embfast.session import CPU_DISABLED_OPTIMIZERS
    from embfast.tokenization import TextTokenizer
    from embfast.variants import ensure_variant

    folder = ensure_exported(default_model_path())
    fused = ensure_variant(folder, "fp32")
    man = read_manifest(folder)
    data, rnd = Path(args.data), random.Random(2)
    sentences = (data / "throughput" / "sentences.txt").read_text("utf-8").splitlines()
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    texts = rnd.sample(sentences, args.sentences) + [
        (d["title"] + " " + d["text"]).strip() for d in rnd.sample(docs, args.passages)]
    tok = TextTokenizer(folder / "tokenizer.json", 256, man["input_names"])
    t = tok.tokenize(texts)
    batches = plan_batches(t.lengths, 32, 16384)

    def encode(path) -> tuple[np.ndarray, float]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=CPU_DISABLED_OPTIMIZERS)
        names = [i.name for i in sess.get_inputs()]
        out = np.empty((len(texts), 384), np.float32)
        t0 = time.perf_counter()
        for rows in batches:
            feeds = tok.pad(t.ids, rows)
            hidden = sess.run(None, {n: feeds[n] for n in names})[0]
            out[rows] = pool(hidden, feeds["attention_mask"], "mean")
        return l2_normalize(out), time.perf_counter() - t0

    base, t_base = encode(folder / "model.onnx")
    rows = [("plain export", base, t_base)]
    emb, secs = encode(fused)
    rows.append(("fused graph (fp32)", emb, secs))
    nodes = {n.name: n.op_type for n in onnx.load(str(fused)).graph.node}
    excluded = {
        "attention": [n for n, op in nodes.items() if op == "Attention"],
        "FFN output": [n for n in nodes if "/output/dense" in n and "attention" not in n],
        "first and last layer": [n for n in nodes if "layer.0/" in n or "layer.5/" in n or
                                 n in ("Attention_0", "Attention_5")],
    }
    configs = {
        "per-channel QInt8 (shipped)": dict(per_channel=True, weight_type=QuantType.QInt8),
        "per-channel QInt8 + reduce_range": dict(per_channel=True, reduce_range=True, weight_type=QuantType.QInt8),
        "per-channel QUInt8": dict(per_channel=True, weight_type=QuantType.QUInt8),
        "per-channel QInt8, MatMul only": dict(per_channel=True, weight_type=QuantType.QInt8,
                                               op_types_to_quantize=["MatMul"]),
        **{f"per-channel QInt8, {k} kept fp32": dict(per_channel=True, weight_type=QuantType.QInt8,
                                                      nodes_to_exclude=v) for k, v in excluded.items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in configs.items():
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(fused, out, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **kw)
            emb, secs = encode(out)
            rows.append((name, emb, secs))
    for name, emb, secs in rows:
        cos = (emb * base).sum(1)
        print(json.dumps({"config": name, "texts": len(texts), "seconds": round(secs, 2),
                          "x_plain": round(t_base / secs, 2), "min_cosine": round(float(cos.min()), 4),
                          "mean_cosine": round(float(cos.mean()), 4)}), flush=True)


if __name__ == "__main__":
    main()
