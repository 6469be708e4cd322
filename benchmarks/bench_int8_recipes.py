"""int8 recipes for all-MiniLM-L6-v2: speed, cosine to fp32 and batch invariance, in one run.

python benchmarks/bench_int8_recipes.py --data ../shared/data --sentences 1000 --passages 100 --threads 2 --repeat 3

Recipes (each a graph built here from the cached fused fp32 graph, run through one ONNX Runtime session
with embfast's batching: length-sorted, 32 texts and 1,024 padded tokens per batch):
  fused fp32        the fp32 variant (reference for speed)
  dynamic           quantize_dynamic, per-channel QInt8 weights, one activation scale per tensor
                    (QAttention; EMBFAST_INT8_RECIPE=dynamic, the default int8 variant until issue 14)
  rows              embfast.rowquant: Attention split into MatMul + MultiHeadAttention, every MatMul
                    u8s8 with one activation scale per row (per token), SmoothQuant on LayerNorm-fed
                    inputs, GELU rows with zero point 16, each MatMul one fused ai.embfast::RowQuantMatMul
                    with its bias, residual and GELU (embfast.ortops; the default int8 variant, int8-rows)
  rows-graph        the same quantization written with ONNX Runtime's operators (MatMulIntegerToFloat and
                    element-wise nodes; what int8-rows is without the operator library)
  rows-unsmoothed   rows without smoothing (no calibration)
  nbits8            MatMulNBits, 8-bit weights (block 128, symmetric), accuracy_level 4 (MLAS int8
                    compute, activations per row and block), on the split-attention graph; needs onnx-ir
Texts: the bench_encode.py sample (seed 0). Runs alternate between recipes; medians. Cosine: to the plain
fp32 export, min / 1st percentile / mean. Invariance: max abs difference of the normalized vectors between
each of 40 texts (short, long, odd) encoded alone and in one mixed batch.
"""

from __future__ import annotations

import argparse
import os

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="../shared/data")
p.add_argument("--sentences", type=int, default=1000)
p.add_argument("--passages", type=int, default=100)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeat", type=int, default=3)
p.add_argument("--recipes", nargs="*",
               default=["fused fp32", "dynamic", "rows", "rows-graph", "rows-unsmoothed", "nbits8"])
ARGS = p.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ODD = ["ok", "a", "?", "!!!!!!!!!!!!!!!!!!!!!!!!", "ÆØÅ ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🤖🤖🤖", "x" * 300,
       "1 2 3 4 5 6 7 8 9 0 " * 20, "日本語のテキスト"]


def main() -> None:
    warnings.filterwarnings("ignore")
    import onnx
    import onnxruntime as ort

    from embfast import ortops
    from embfast.batching import plan_batches
    from embfast.export import default_model_path, ensure_exported, read_manifest
    from embfast.kernels import l2_normalize, pool
    from embfast.rowquant import build_rowquant, calibration_feeds, split_attention
    from embfast.session import CPU_DISABLED_OPTIMIZERS
    from embfast.tokenization import TextTokenizer
    from embfast.variants import _probe_tokenizer, _quantize_dynamic_int8, _quantize_int8, ensure_variant

    folder = ensure_exported(default_model_path())
    fused = ensure_variant(folder, "fp32")
    man = read_manifest(folder)
    data, rnd = Path(ARGS.data), random.Random(0)
    sentences = (data / "throughput" / "sentences.txt").read_text("utf-8").splitlines()
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    texts = rnd.sample(sentences, ARGS.sentences) + [
        (d["title"] + " " + d["text"]).strip() for d in rnd.sample(docs, ARGS.passages)] + ODD
    tok = TextTokenizer(folder / "tokenizer.json", 256, man["input_names"])
    t = tok.tokenize(texts)
    batches = plan_batches(t.lengths, 32, 1024)
    inv = list(range(0, len(texts) - len(ODD), (len(texts) - len(ODD)) // 32))[:32] + list(
        range(len(texts) - len(ODD), len(texts)))

    def session(path):
        opts = ortops.session_options(ARGS.threads)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=CPU_DISABLED_OPTIMIZERS)

    def encode(sess, plan) -> np.ndarray:
        names = [i.name for i in sess.get_inputs()]
        out = np.zeros((len(texts), 384), np.float32)
        for rows in plan:
            feeds = tok.pad(t.ids, np.asarray(rows))
            hidden = sess.run(None, {n: feeds[n] for n in names})[0]
            out[rows] = pool(hidden, feeds["attention_mask"], "mean")
        return l2_normalize(out)

    base = encode(session(folder / "model.onnx"), batches)
    tmp = Path(tempfile.mkdtemp())
    graphs = {}
    for name in ARGS.recipes:
        path = tmp / f"{name.replace(' ', '_')}.onnx"
        if name == "fused fp32":
            path = fused
        elif name == "dynamic":
            _quantize_dynamic_int8(fused, path)
        elif name == "rows":
            _quantize_int8(fused, path, "int8-rows", folder, man)
        elif name == "rows-graph":
            build_rowquant(fused, path, calibration=calibration_feeds(_probe_tokenizer(folder, man)), fused=False)
        elif name == "rows-unsmoothed":
            build_rowquant(fused, path)
        elif name == "nbits8":
            try:
                from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
            except ImportError as exc:
                print(json.dumps({"recipe": name, "skipped": str(exc)}))
                continue
            model = onnx.load(str(fused))
            split_attention(model)
            q = MatMulNBitsQuantizer(model, bits=8, block_size=128, is_symmetric=True, accuracy_level=4)
            q.process()
            q.model.save_model_to_file(str(path), use_external_data_format=False)
        else:
            raise SystemExit(f"unknown recipe {name!r}")
        graphs[name] = path
    sessions = {n: session(pth) for n, pth in graphs.items()}
    quality = {}
    for name, sess in sessions.items():  # warm-up doubles as the accuracy pass
        emb = encode(sess, batches)
        cos = (emb * base).sum(1)
        alone = encode(sess, [[i] for i in inv])[inv]
        mixed = encode(sess, [inv])[inv]
        quality[name] = {"min_cosine": round(float(cos.min()), 4), "p1_cosine": round(float(np.percentile(cos, 1)), 4),
                         "mean_cosine": round(float(cos.mean()), 5),
                         "invariance_max_abs": float(np.abs(alone - mixed).max())}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(ARGS.repeat):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            encode(sess, batches)
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["dynamic"]) if "dynamic" in times else None
    print("| recipe | median s | x dynamic | min / p1 / mean cosine to fp32 | alone vs mixed batch, max abs |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med, q = statistics.median(ts), quality[name]
        print(json.dumps({"recipe": name, "median_s": round(med, 3), "runs": [round(x, 3) for x in ts], **q}),
              flush=True)
        print(f"| {name} | {med:.3f} | {ref / med if ref else float('nan'):.2f} | {q['min_cosine']} / "
              f"{q['p1_cosine']} / {q['mean_cosine']} | {q['invariance_max_abs']:.2g} |", flush=True)


if __name__ == "__main__":
    main()
