"""GPU measurements, side by side on one GPU: sentence-transformers (torch fp16) vs embfast CUDA fp16 / fp32.

python benchmarks/bench_gpu.py --export-dir .gpu/carried/export --st-model .gpu/carried/st_model \
    --texts .gpu/carried/texts.txt --out $OUT/gpu.json

Measures batch-job throughput (texts/s, tokens/s), single-query latency p50/p99, agreement of embfast fp16
with embfast CPU fp32 (cosine), and exact top-k over 1M vectors (embfast DeviceTopK fp16 / fp32 against
torch.topk on the same GPU). Runs on the CPU too (for a dry run), where CUDA rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def timed(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-dir", required=True, help="an embfast-exported folder (model.onnx, model.fp16.onnx)")
    p.add_argument("--st-model", required=True, help="the sentence-transformers folder of the same model")
    p.add_argument("--texts", required=True, help="one text per line")
    p.add_argument("--limit", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--corpus", type=int, default=1_000_000)
    p.add_argument("--out", default="gpu.json")
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    import embfast
    from embfast.gpu import DeviceTopK

    rows: list[dict] = []

    def emit(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    emit(section="setup", gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
         onnxruntime=ort.__version__, providers=ort.get_available_providers(), torch=torch.__version__,
         build=embfast.build_info())
    texts = [t for t in Path(args.texts).read_text("utf-8").splitlines() if t.strip()][: args.limit]
    cpu = embfast.Embedder(args.export_dir, device="cpu", precision="fp32")
    tokens = int(cpu.count_tokens(texts).sum())
    reference = cpu.encode(texts[:2000], batch_size=64)

    impls = {}
    if cuda:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(args.st_model, device="cuda", model_kwargs={"torch_dtype": torch.float16})
        impls["st-torch-fp16"] = lambda t: st.encode(t, batch_size=args.batch_size)
        for prec in ("fp16", "fp32"):
            m = embfast.Embedder(args.export_dir, device="cuda", precision=prec)
            impls[f"embfast-cuda-{prec}"] = lambda t, m=m: m.encode(t, batch_size=args.batch_size,
                                                                    max_batch_tokens=None)
    for name, fn in impls.items():
        out = np.asarray(fn(texts[:2000]), dtype=np.float32)
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        emit(section="agreement", impl=name, vs="embfast-cpu-fp32", min_cosine=float(cos.min()),
             mean_cosine=float(cos.mean()))
    base = None
    for name, fn in impls.items():
        secs = timed(lambda fn=fn: fn(texts), args.repeat)
        base = base or secs
        emit(section="throughput", impl=name, texts=len(texts), seconds=round(secs, 3),
             texts_s=round(len(texts) / secs, 1), tokens_s=round(tokens / secs), x_st=round(base / secs, 2))
    for name, fn in impls.items():
        lat = []
        for _ in range(200):
            t0 = time.perf_counter()
            fn(["how do vaccines train the immune system?"])
            lat.append((time.perf_counter() - t0) * 1000)
        emit(section="latency", impl=name, p50_ms=round(float(np.percentile(lat, 50)), 2),
             p99_ms=round(float(np.percentile(lat, 99)), 2))
    if cuda:
        rng = np.random.default_rng(0)
        corpus = rng.standard_normal((args.corpus, 384), dtype=np.float32)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        for nq in (1, 16, 1000):
            q = corpus[:nq]
            ct = torch.from_numpy(corpus).cuda()
            qt_host = torch.from_numpy(q)

            def torch_topk(ct=ct, qt_host=qt_host):
                s, i = torch.topk(qt_host.cuda() @ ct.T, 10, dim=1)
                return s.cpu(), i.cpu()

            t_torch = timed(torch_topk, 10)
            emit(section="topk", impl="torch.topk fp32", n=args.corpus, q=nq, ms=round(t_torch * 1000, 3))
            for fp16 in (False, True):
                dt = DeviceTopK(corpus, device="cuda", fp16=fp16)
                t = timed(lambda dt=dt, q=q: dt.search(q, 10), 10)
                s, i = dt.search(q, 10)
                same = float((i == torch_topk()[1].numpy()).mean())
                emit(section="topk", impl=f"embfast DeviceTopK {'fp16' if fp16 else 'fp32'}", n=args.corpus, q=nq,
                     ms=round(t * 1000, 3), x_torch=round(t_torch / t, 2), same_indices_as_torch=same)
            del ct
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
