"""CPU speed of the onnxruntime build (CPU) against onnxruntime-gpu's CPU provider, one command.

python benchmarks/bench_ort_builds.py --model-dir ~/.cache/embfast/models/<exported> \
    --python /usr/bin/python3 /tmp/ortcpu/bin/python /tmp/ortgpu/bin/python --repeat 7

Both builds provide the module ``onnxruntime`` and must never share an environment, so each
interpreter (one venv per build) runs this same file as a worker; the driver alternates them and
prints medians and ratios. Workers need only numpy, tokenizers and their onnxruntime. Providers are
passed explicitly (onnxruntime-gpu lists TensorRT and CUDA first even without a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(model_dir: Path, threads: int, batches: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding()
    tok.enable_truncation(256)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    texts = [("The committee reviewed the proposal and asked for a revised budget " * (1 + i % 8)).strip()
             for i in range(32)]
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
             "token_type_ids": np.zeros_like(ids)}
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(batches):
        sess.run(None, feeds)
    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "seconds_per_batch": (time.perf_counter() - t0) / batches, "batch_tokens": int(ids.size)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a folder with model.onnx and tokenizer.json")
    p.add_argument("--python", nargs="+", default=[sys.executable], help="interpreters, one per onnxruntime build")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.model_dir), args.threads, args.batches)))
        return
    results: dict[str, list[float]] = {py: [] for py in args.python}
    meta = {}
    for _ in range(args.repeat):
        for py in args.python:
            out = subprocess.run([py, __file__, "--worker", "--model-dir", args.model_dir, "--threads",
                                  str(args.threads), "--batches", str(args.batches)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[py].append(r["seconds_per_batch"])
            meta[py] = r
    base = statistics.median(results[args.python[0]])
    print("| interpreter | onnxruntime | providers listed | median ms / batch of 32 | x first |")
    print("|---|---|---|---|---|")
    for py, ts in results.items():
        med = statistics.median(ts)
        m = meta[py]
        gpu = "gpu build" if "CUDAExecutionProvider" in m["providers"] else "cpu build"
        print(f"| {py} | {m['onnxruntime']} ({gpu}) | {', '.join(m['providers'])} | {med * 1000:.1f} | "
              f"{base / med:.3f} |")


if __name__ == "__main__":
    main()
