"""Encode throughput and latency on the CPU: embfast vs sentence-transformers vs plain onnxruntime, one run.

python benchmarks/bench_encode.py --data ../shared/data --sentences 1000 --passages 100 --threads 2 --repeat 5

The texts: a fixed random sample (seed 0) of real sentences from throughput/sentences.txt plus SciFact
passages (title + text; most are longer than 256 word-pieces and get truncated). Every implementation
encodes the same texts; runs alternate between implementations and medians are reported, with ratios to
sentence-transformers (torch). Also: tokens/s, the fraction of this machine's measured fp32 sgemm peak the
model reaches (model FLOPs per token x tokens/s), single-query latency p50/p99 and cold start.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--passages", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-calls", type=int, default=200)
    p.add_argument("--impls", nargs="*", default=None,
                   help="subset of: st-torch st-onnx st-onnx-int8 ort-plain embfast-fp32 embfast-int8 "
                        "(the default int8: one scale per row, batch-invariant, EMBFAST_INT8_RECIPE=rows) "
                        "embfast-int8-dynamic (ONNX Runtime's per-tensor recipe, EMBFAST_INT8_RECIPE=dynamic)")
    return p.parse_args()


ARGS = _parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore")
QUERY = "how do vaccines train the immune system?"


def load_texts() -> tuple[list[str], dict]:
    data = Path(ARGS.data)
    rnd = random.Random(0)
    sentences = (data / "throughput" / "sentences.txt").read_text("utf-8").splitlines()
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    texts = rnd.sample(sentences, ARGS.sentences) + [
        (d["title"] + " " + d["text"]).strip() for d in rnd.sample(docs, ARGS.passages)]
    return texts, {"sentences": ARGS.sentences, "passages": ARGS.passages}


def model_flops(lengths: np.ndarray, hf: dict) -> float:
    """Forward FLOPs (multiply-add = 2) of a BERT encoder over texts of these token lengths."""
    h, inter, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    n = lengths.astype(np.float64)
    per_layer = 2 * (4 * h * h + 2 * h * inter) * n + 2 * 2 * n * n * h  # projections + QK^T and AV
    return float(layers * per_layer.sum())


def sgemm_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((2048, 384)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((384, 1536)).astype(np.float32)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 * 384 * 1536 / best / 1e9


class PlainOrt:
    """What a user writes by hand: tokenizers (batch-longest) + onnxruntime + numpy mean pooling, input order."""

    def __init__(self, folder: Path, max_len: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.enable_padding()
        self.tok.enable_truncation(max_len)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ARGS.threads
        self.sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(texts), ARGS.batch_size):
            enc = self.tok.encode_batch(texts[s:s + ARGS.batch_size])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            h = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            m = mask[:, :, None].astype(np.float32)
            v = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        return np.vstack(out)


def build_impls(model_dir: Path, export_dir: Path, tmp: Path) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    import embfast

    torch.set_num_threads(ARGS.threads)
    wanted = set(ARGS.impls or ["st-torch", "st-onnx", "st-onnx-int8", "ort-plain", "embfast-fp32",
                                "embfast-int8"])
    impls = {}
    if "st-torch" in wanted:
        st = SentenceTransformer(str(model_dir), device="cpu")
        impls["st-torch"] = lambda t, st=st: st.encode(t, batch_size=ARGS.batch_size)
    if wanted & {"st-onnx", "st-onnx-int8"}:
        st_dir = tmp / "st_model"  # sentence-transformers writes its ONNX into the model folder: use a copy
        shutil.copytree(model_dir, st_dir)
        # Its own export path (optimum via AutoConfig) fails on this folder with sentence-transformers 5.7 +
        # optimum-onnx 0.1.0, so it gets the same optimum export embfast made (identical graph).
        (st_dir / "onnx").mkdir()
        shutil.copy(export_dir / "model.onnx", st_dir / "onnx" / "model.onnx")
        st_onnx = SentenceTransformer(str(st_dir), device="cpu", backend="onnx",
                                      model_kwargs={"file_name": "onnx/model.onnx"})
        if "st-onnx" in wanted:
            impls["st-onnx"] = lambda t, m=st_onnx: m.encode(t, batch_size=ARGS.batch_size)
        if "st-onnx-int8" in wanted:
            from sentence_transformers import export_dynamic_quantized_onnx_model

            export_dynamic_quantized_onnx_model(st_onnx, "avx2", str(st_dir))
            st_q = SentenceTransformer(str(st_dir), device="cpu", backend="onnx",
                                       model_kwargs={"file_name": "onnx/model_quint8_avx2.onnx"})
            impls["st-onnx-int8"] = lambda t, m=st_q: m.encode(t, batch_size=ARGS.batch_size)
    if "ort-plain" in wanted:
        plain = PlainOrt(export_dir, 256)
        impls["ort-plain"] = plain.encode
    for prec in ("fp32", "int8", "int8-dynamic"):
        if f"embfast-{prec}" in wanted:
            recipe = os.environ.get("EMBFAST_INT8_RECIPE")
            os.environ.pop("EMBFAST_INT8_RECIPE", None)  # the recipe is read at construction
            if prec.startswith("int8"):
                os.environ["EMBFAST_INT8_RECIPE"] = "dynamic" if prec == "int8-dynamic" else "rows"
            try:
                m = embfast.Embedder(model_dir, precision=prec.split("-")[0], threads=ARGS.threads)
            finally:
                os.environ.pop("EMBFAST_INT8_RECIPE", None)
                if recipe is not None:
                    os.environ["EMBFAST_INT8_RECIPE"] = recipe
            impls[f"embfast-{prec}"] = lambda t, m=m: m.encode(t, batch_size=ARGS.batch_size)
    return impls


def cold_start() -> float:
    code = ("import time; t=time.perf_counter(); import embfast; m=embfast.Embedder(); m.encode('hello'); "
            "print(time.perf_counter()-t)")
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=tempfile.gettempdir()).stdout.strip()) for _ in range(3)]
    return statistics.median(runs)


def main() -> None:
    import embfast
    from embfast.export import default_model_path, ensure_exported

    model_dir = default_model_path()
    export_dir = ensure_exported(model_dir)
    texts, mix = load_texts()
    probe = embfast.Embedder(model_dir)
    lengths = probe.count_tokens(texts)
    hf = json.loads((model_dir / "config.json").read_text())
    flops = model_flops(lengths, hf)
    peak = sgemm_gflops()
    info = embfast.build_info()
    print(json.dumps({"section": "setup", "texts": len(texts), **mix, "tokens": int(lengths.sum()),
                      "truncated": int((lengths >= 256).sum()), "gflop_per_pass": round(flops / 1e9, 1),
                      "sgemm_gflop_s": round(peak, 1), "threads": ARGS.threads, "isa": info["isa"],
                      "onnxruntime": info["onnxruntime"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmpd:
        impls = build_impls(model_dir, export_dir, Path(tmpd))
        ref = None
        for name, fn in impls.items():  # warm-up + accuracy vs sentence-transformers on the same texts
            out = fn(texts[:200])
            if ref is None:
                ref = out
            cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
            print(json.dumps({"section": "agreement", "impl": name, "vs": next(iter(impls)),
                              "min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5)}),
                  flush=True)
        times: dict[str, list[float]] = {n: [] for n in impls}
        for _ in range(ARGS.repeat):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn(texts)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["st-torch"]) if "st-torch" in times else None
        rows = []
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {"section": "throughput", "impl": name, "median_s": round(med, 3),
                   "texts_s": round(len(texts) / med, 1), "tokens_s": round(float(lengths.sum()) / med),
                   "x_st_torch": round(base / med, 2) if base else None,
                   "pct_sgemm_peak": round(100 * flops / med / 1e9 / peak, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        lat_rows = []
        for name, fn in impls.items():
            lat = []
            for _ in range(ARGS.latency_calls):
                t0 = time.perf_counter()
                fn([QUERY])
                lat.append((time.perf_counter() - t0) * 1000)
            lat_rows.append({"section": "latency", "impl": name, "p50_ms": round(float(np.percentile(lat, 50)), 2),
                             "p99_ms": round(float(np.percentile(lat, 99)), 2)})
            print(json.dumps(lat_rows[-1]), flush=True)
    cs = cold_start()
    print(json.dumps({"section": "cold_start", "impl": "embfast-fp32", "seconds_to_first_embedding": round(cs, 2)}))
    print("\n| impl | median s | texts/s | tokens/s | x st-torch | % sgemm peak | latency p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r, lr in zip(rows, lat_rows, strict=True):
        print(f"| {r['impl']} | {r['median_s']} | {r['texts_s']} | {r['tokens_s']} | {r['x_st_torch']} | "
              f"{r['pct_sgemm_peak']} | {lr['p50_ms']} / {lr['p99_ms']} |")
    print(f"\ncold start (import + load cached model + first embedding): {cs:.2f} s")


if __name__ == "__main__":
    main()
