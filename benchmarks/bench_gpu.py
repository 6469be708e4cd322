"""GPU measurements, side by side on one GPU: sentence-transformers (torch fp16) vs embfast CUDA fp16 / fp32.

python benchmarks/bench_gpu.py --export-dir EXPORT --st-model ST_FOLDER --texts sentences.txt \
    --passages passages.txt --out $OUT/gpu.json          (benchmarks/gpu_check.sh runs it)

Measures, on one GPU, with the same texts for everyone:
- agreement of each CUDA implementation with embfast CPU fp32 (cosine over 2,000 sentences);
- batch-job throughput (texts/s, tokens/s; median of --repeat runs after one warm-up) on real
  sentences and on SciFact passages, at batch sizes 256 and 1024, for sentence-transformers fp16,
  embfast CUDA fp16 and embfast CUDA fp32;
- single-query latency p50/p99 (200 calls);
- exact top-k over 1M x 384 normalized vectors: embfast DeviceTopK fp32/fp16 vs torch (matmul +
  torch.topk) on the same GPU, queries from and results to the host for both.
Rows are printed as JSON lines and written to --out after every row (a killed run keeps what it had).
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


def read_lines(path: str, limit: int) -> list[str]:
    return [t for t in Path(path).read_text("utf-8").splitlines() if t.strip()][:limit]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-dir", required=True, help="an embfast-exported folder (fp32 and fp16 variants)")
    p.add_argument("--st-model", required=True, help="the sentence-transformers folder of the same model")
    p.add_argument("--texts", required=True, help="sentences, one per line")
    p.add_argument("--passages", help="passages, one per line (optional)")
    p.add_argument("--limit", type=int, default=20000)
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
        Path(args.out).write_text(json.dumps(rows, indent=1))

    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    emit(section="setup", gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
         onnxruntime=ort.__version__, providers=ort.get_available_providers(), torch=torch.__version__,
         build=embfast.build_info())
    sets = {"sentences": read_lines(args.texts, args.limit)}
    if args.passages:
        sets["passages"] = read_lines(args.passages, args.limit)
    cpu = embfast.Embedder(args.export_dir, device="cpu", precision="fp32")
    reference = cpu.encode(sets["sentences"][:2000], batch_size=64)
    tokens = {name: int(cpu.count_tokens(t).sum()) for name, t in sets.items()}

    impls: dict = {}  # name -> (fn(texts, batch_size), kind)
    if cuda:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(args.st_model, device="cuda").half()
        impls["st-torch-fp16"] = lambda t, bs: st.encode(t, batch_size=bs)
        models = {"fp16": embfast.Embedder(args.export_dir, device="cuda", precision="fp16"),
                  "fp32": embfast.Embedder(args.export_dir, device="cuda", precision="fp32")}
        for name, m in models.items():
            emit(section="model", impl=f"embfast-cuda-{name}", precision=m.precision, device=m.device,
                 provider=m.session.provider, load_s=round(m.load_seconds, 2))
            impls[f"embfast-cuda-{name}"] = lambda t, bs, m=m: m.encode(t, batch_size=bs)
    for name, fn in impls.items():
        out = np.asarray(fn(sets["sentences"][:2000], 256), dtype=np.float32)
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        emit(section="agreement", impl=name, vs="embfast-cpu-fp32", texts=2000, min_cosine=float(cos.min()),
             mean_cosine=float(cos.mean()))
    for set_name, texts in sets.items():
        for bs in (256, 1024):
            base = None
            for name, fn in impls.items():
                secs = timed(lambda fn=fn: fn(texts, bs), args.repeat)
                base = base or secs
                emit(section="throughput", texts_set=set_name, batch_size=bs, impl=name, texts=len(texts),
                     tokens=tokens[set_name], seconds=round(secs, 4), texts_s=round(len(texts) / secs, 1),
                     tokens_s=round(tokens[set_name] / secs), x_st=round(base / secs, 2))
    for name, fn in impls.items():
        lat = []
        for _ in range(200):
            t0 = time.perf_counter()
            fn(["how do vaccines train the immune system?"], 32)
            lat.append((time.perf_counter() - t0) * 1000)
        emit(section="latency", impl=name, p50_ms=round(float(np.percentile(lat, 50)), 3),
             p99_ms=round(float(np.percentile(lat, 99)), 3))
    if cuda:
        rng = np.random.default_rng(0)
        corpus = rng.standard_normal((args.corpus, 384), dtype=np.float32)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        ct = torch.from_numpy(corpus).cuda()
        searchers = {fp16: DeviceTopK(corpus, device="cuda", fp16=fp16) for fp16 in (False, True)}
        for nq in (1, 16, 1000):
            q = corpus[:nq]
            qt_host = torch.from_numpy(q)

            def torch_topk(qt_host=qt_host):
                s, i = torch.topk(qt_host.cuda() @ ct.T, 10, dim=1)
                return s.cpu(), i.cpu()

            t_torch = timed(torch_topk, 10)
            ref_i = torch_topk()[1].numpy()
            emit(section="topk", impl="torch matmul+topk fp32", n=args.corpus, q=nq, ms=round(t_torch * 1000, 3))
            for fp16, dt in searchers.items():
                t = timed(lambda dt=dt, q=q: dt.search(q, 10), 10)
                s, i = dt.search(q, 10)
                emit(section="topk", impl=f"embfast DeviceTopK {'fp16' if fp16 else 'fp32'}", n=args.corpus, q=nq,
                     ms=round(t * 1000, 3), x_torch=round(t_torch / t, 2),
                     same_indices_as_torch=float((i == ref_i).mean()),
                     top1_is_self=float((i[:, 0] == np.arange(nq)).mean()))


if __name__ == "__main__":
    main()
