"""Where ONNX Runtime spends an encode on the CPU, per operator type, and the fused-op choices behind it.

python benchmarks/bench_ort_ops.py --data ../shared/data --sentences 1000 --passages 100

1. Operator profile: ORT's own profiler over one pass of the bench_encode texts (seed 0 sample of real
   sentences + SciFact passages, batches as embfast plans them), for the shipped fp32 and int8 variants and
   for the same recipes with SkipLayerNormalization fused (the recipe before VARIANT_FORMAT 2).
2. Kernel micro-benchmarks on one batch-sized tensor (32 x 25 x 384, or x 1536 for GELU): the fused
   SkipLayerNormalization against Add + LayerNormalization, and exact BiasGelu against the tanh FastGelu.
Medians; 2 threads. Rows are JSON lines.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def texts_of(data: Path, n_sentences: int, n_passages: int) -> list[str]:
    rnd = random.Random(0)  # the bench_encode sample
    sentences = (data / "throughput" / "sentences.txt").read_text("utf-8").splitlines()
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    return rnd.sample(sentences, n_sentences) + [d["title"] + " " + d["text"] for d in rnd.sample(docs, n_passages)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--passages", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    import embfast
    from embfast.batching import plan_batches
    from embfast.encoder import CPU_MAX_BATCH_TOKENS
    from embfast.export import default_model_path, ensure_exported
    from embfast.session import CPU_DISABLED_OPTIMIZERS
    from embfast.variants import _quantize_int8, ensure_variant

    def options() -> ort.SessionOptions:
        o = ort.SessionOptions()
        o.intra_op_num_threads = args.threads
        o.add_session_config_entry("session.intra_op.allow_spinning", "1")
        return o

    folder = ensure_exported(default_model_path())
    model = embfast.Embedder(threads=args.threads)
    tok = model.tokenizer.tokenize(texts_of(Path(args.data), args.sentences, args.passages))
    feeds = [model.tokenizer.pad(tok.ids, rows) for rows in plan_batches(tok.lengths, 32, CPU_MAX_BATCH_TOKENS)]
    names = model.session.input_names

    work = Path(tempfile.mkdtemp(prefix="embfast-ops-"))
    fused = work / "skipln.onnx"  # the old recipe: SkipLayerNormalization fused
    fo = FusionOptions("bert")
    fo.enable_gelu_approximation = False
    optimize_model(str(folder / "model.onnx"), model_type="bert", num_heads=0, hidden_size=0,
                   optimization_options=fo, opt_level=1, use_gpu=False).save_model_to_file(str(fused))
    fused_int8 = work / "skipln.int8.onnx"
    _quantize_int8(fused, fused_int8)
    graphs = {"fp32 (shipped)": (ensure_variant(folder, "fp32"), CPU_DISABLED_OPTIMIZERS),
              "fp32 + SkipLayerNorm": (fused, []),
              "int8 (shipped)": (ensure_variant(folder, "int8"), CPU_DISABLED_OPTIMIZERS),
              "int8 + SkipLayerNorm": (fused_int8, [])}
    for label, (path, disabled) in graphs.items():
        o = options()
        o.enable_profiling = True
        o.profile_file_prefix = str(work / "profile")
        sess = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        for f in feeds[:3]:  # warm-up, inside the profile too but tiny
            sess.run(None, {n: f[n] for n in names})
        t0 = time.perf_counter()
        for f in feeds:
            sess.run(None, {n: f[n] for n in names})
        wall = time.perf_counter() - t0
        events = json.loads(Path(sess.end_profiling()).read_text())
        per_op: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"]
        total = sum(per_op.values())
        print(json.dumps({"section": "profile", "graph": label, "pass_s": round(wall, 3),
                          "ops_ms": {k: round(v / 1000, 1) for k, v in per_op.most_common()},
                          "ops_pct": {k: round(100 * v / total, 1) for k, v in per_op.most_common()}}), flush=True)

    rng = np.random.default_rng(0)

    def micro(label: str, nodes, inputs: dict[str, np.ndarray], inits) -> None:
        shape = list(next(iter(inputs.values())).shape)
        graph = helper.make_graph(
            nodes, label, [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["b", "s", shape[2]]) for k in inputs],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", shape[2]])], inits)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        m = helper.make_model(graph, opset_imports=opsets, ir_version=8)
        sess = ort.InferenceSession(m.SerializeToString(), options(), providers=["CPUExecutionProvider"],
                                    disabled_optimizers=CPU_DISABLED_OPTIMIZERS)
        for _ in range(20):
            sess.run(None, inputs)
        ts = []
        for _ in range(300):
            t0 = time.perf_counter()
            sess.run(None, inputs)
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        size = int(np.prod(shape))
        print(json.dumps({"section": "kernel", "what": label, "shape": shape, "us": round(med * 1e6, 1),
                          "ns_per_element": round(med * 1e9 / size, 3)}), flush=True)

    h = 384
    g = numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), "g")
    b = numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), "b")
    x = {name: rng.standard_normal((32, 25, h)).astype(np.float32) for name in ("x", "s")}
    micro("SkipLayerNormalization", [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"],
                                                      domain="com.microsoft", epsilon=1e-12)], x, [g, b])
    micro("Add + LayerNormalization", [helper.make_node("Add", ["x", "s"], ["a"]),
                                       helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1,
                                                        epsilon=1e-12)], x, [g, b])
    f = 1536
    bias = numpy_helper.from_array(rng.standard_normal(f).astype(np.float32) * 0.1, "bias")
    xg = {"x": rng.standard_normal((32, 25, f)).astype(np.float32)}
    for label, op in (("BiasGelu (exact erf)", "BiasGelu"), ("FastGelu (tanh)", "FastGelu")):
        micro(label, [helper.make_node(op, ["x", "bias"], ["y"], domain="com.microsoft")], xg, [bias])
    for file in work.iterdir():
        os.unlink(file)
    os.rmdir(work)


if __name__ == "__main__":
    main()
