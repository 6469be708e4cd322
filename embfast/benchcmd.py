"""``embfast bench``: measure this machine for a model and write a markdown report with PNG plots.

Grid: every (precision, provider) the machine runs x sequence lengths x batch sizes,
throughput as texts/s and tokens/s (median of ``--repeat`` runs, after a warm-up);
single-text latency p50 / p99 on real sentences; sentence-transformers on the same
folder side by side when it is installed (CPU). Inputs of a given sequence length
are real sentences (the bundled sample) concatenated and cut to exactly that many
tokens, special tokens included. Outputs in ``-o`` (default ``bench-report/``):
``report.md``, ``results.jsonl`` (one JSON object per measurement),
``throughput.png`` (texts/s vs batch size, one line per engine, precision and length)
and ``latency.png`` (single-text latency distribution).

Benchmarks measure, they never judge: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from embfast.text import split_lines


def _ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from exc
    if not vals or min(vals) < 1:
        raise ValueError(f"expected comma-separated integers >= 1, got {s!r}")
    return vals


def sample_sentences() -> list[str]:
    """The bundled real sentences (embfast/data/sample.txt)."""
    text = (resources.files("embfast") / "data" / "sample.txt").read_text("utf-8")
    return [line for line in split_lines(text) if line.strip()]


def texts_of_length(embedder, length: int, count: int) -> list[str]:
    """``count`` texts of exactly ``length`` tokens (special tokens included, when the text allows it).

    Built from the bundled sentences, rotated so that the texts differ.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(embedder.tokenizer.tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    specials = len(tok.encode("", add_special_tokens=True).ids)
    want = max(length - specials, 1)
    sents = sample_sentences()
    out = []
    for i in range(count):
        parts, j = [], i
        text = ""
        while True:
            parts.append(sents[j % len(sents)])
            j += 1
            text = " ".join(parts)
            enc = tok.encode(text, add_special_tokens=False)
            if len(enc.ids) >= want:
                out.append(text[: enc.offsets[want - 1][1]])
                break
    return out


def _time_median(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _engines(args):
    """(label, precision, device, encode(texts, batch_size)) for each engine measured."""
    from embfast import Embedder
    from embfast.session import cuda_available

    devices = args.devices.split(",") if args.devices else (["cpu", "cuda"] if cuda_available() else ["cpu"])
    base = None
    for device in devices:
        precisions = args.precisions.split(",") if args.precisions else (
            ["fp32", "int8"] if device == "cpu" else ["fp32", "fp16"])
        for prec in precisions:
            m = Embedder(args.model, device=device, precision=prec, threads=args.threads)
            base = base or m
            yield "embfast", prec, m.device, m, (lambda texts, bs, m=m: m.encode(texts, batch_size=bs))
    if args.st and base is not None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            print("bench: sentence-transformers is not installed; skipping it", file=sys.stderr)
            return
        src = base.manifest.get("source")
        if not src or not Path(src).exists():
            print(f"bench: the model's source folder {src!r} is gone; skipping sentence-transformers", file=sys.stderr)
            return
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        st = SentenceTransformer(src, device="cpu")
        st.max_seq_length = base.max_seq_length
        yield "sentence-transformers", "fp32", "cpu", base, (
            lambda texts, bs: st.encode(texts, batch_size=bs, convert_to_numpy=True))


def run_bench(args) -> list[dict]:
    """Measure the grid; returns one dict per measurement (also written to results.jsonl)."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    sents = sample_sentences()
    for engine, prec, device, m, encode in _engines(args):
        lengths = sorted({min(L, m.max_seq_length) for L in _ints(args.seq_lengths)})
        for L in lengths:
            for bs in _ints(args.batch_sizes):
                n = max(bs, args.texts)
                texts = texts_of_length(m, L, n)
                secs = _time_median(lambda texts=texts, bs=bs, f=encode: f(texts, bs), args.repeat)
                r = {"kind": "throughput", "model": m.manifest.get("name"), "engine": engine, "precision": prec,
                     "device": device, "seq_len": L, "batch_size": bs, "texts": n, "seconds": secs,
                     "texts_per_s": n / secs, "tokens_per_s": n * L / secs}
                results.append(r)
                if not args.quiet:
                    print(f"{engine:>21} {prec:>5} {device:>4} seq {L:>4} batch {bs:>4}: "
                          f"{r['texts_per_s']:10.1f} texts/s {r['tokens_per_s']:12.0f} tokens/s", file=sys.stderr)
        lat = []
        encode(sents[:1], 1)
        for i in range(args.latency_runs):
            t = time.perf_counter()
            encode([sents[i % len(sents)]], 1)
            lat.append((time.perf_counter() - t) * 1000)
        r = {"kind": "latency", "model": m.manifest.get("name"), "engine": engine, "precision": prec,
             "device": device, "runs": len(lat),
             "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
             "mean_ms": float(np.mean(lat)), "samples_ms": lat}
        results.append(r)
        if not args.quiet:
            print(f"{engine:>21} {prec:>5} {device:>4} latency: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms",
                  file=sys.stderr)
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r) + "\n")
    return results


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _machine(model_name: str) -> dict:
    from embfast import build_info

    info = build_info()
    return {"model": model_name, "machine": platform.platform(), "processor": _cpu_name(),
            "cores": os.cpu_count(), "isa": info.get("isa"), "openmp": info.get("openmp"),
            "onnxruntime": info.get("onnxruntime"), "providers": info.get("providers"), "embfast": info.get("version")}


def write_report(results: list[dict], out: Path, machine: dict) -> Path:
    """report.md with the machine line and tables, plus throughput.png and latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = [r for r in results if r["kind"] == "throughput"]
    lat = [r for r in results if r["kind"] == "latency"]
    lines = ["# embfast bench", "",
             f"Model `{machine['model']}` on {machine['machine']} ({machine['processor']}, {machine['cores']} cores, "
             f"ISA {machine['isa']}, OpenMP {machine['openmp']}), onnxruntime {machine['onnxruntime']}, "
             f"embfast {machine['embfast']}. Medians of repeated runs after a warm-up.", "",
             "## Throughput", "", "| engine | precision | device | seq len | batch | texts/s | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['precision']} | {r['device']} | {r['seq_len']} | {r['batch_size']} | "
              f"{r['texts_per_s']:.1f} | {r['tokens_per_s']:.0f} |" for r in thr]
    lines += ["", "## Single-text latency", "", "| engine | precision | device | runs | p50 ms | p99 ms |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['precision']} | {r['device']} | {r['runs']} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} |" for r in lat]
    lines += ["", "![throughput vs batch size](throughput.png)", "", "![latency](latency.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")

    fig, ax = plt.subplots(figsize=(8, 5))
    keys = sorted({(r["engine"], r["precision"], r["device"], r["seq_len"]) for r in thr})
    for key in keys:
        pts = sorted((r["batch_size"], r["texts_per_s"]) for r in thr
                     if (r["engine"], r["precision"], r["device"], r["seq_len"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"{key[0]} {key[1]} {key[2]} seq {key[3]}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (texts)")
    ax.set_ylabel("texts / s")
    ax.set_title(f"throughput: {machine['model']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    if lat:
        ax.boxplot([r["samples_ms"] for r in lat], showfliers=True)
        ax.set_xticks(range(1, len(lat) + 1), [f"{r['engine']}\n{r['precision']} {r['device']}" for r in lat],
                      fontsize=7)
    ax.set_ylabel("ms per single text")
    ax.set_title("single-text latency")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    return out / "report.md"


def cmd_bench(args) -> int:
    results = run_bench(args)
    model_name = results[0]["model"] if results else str(args.model)
    report = write_report(results, Path(args.output), _machine(model_name))
    print(f"wrote {report}, {Path(args.output) / 'throughput.png'}, {Path(args.output) / 'latency.png'} "
          f"and {Path(args.output) / 'results.jsonl'}")
    return 0


def register_cli(sub) -> None:
    """Add ``embfast bench``."""
    s = sub.add_parser("bench", help="measure throughput and latency on this machine; markdown report + PNG plots")
    s.add_argument("--model", default=os.environ.get("EMBFAST_MODEL"), help="model folder (default: bundled)")
    s.add_argument("--devices", default=None, help="comma list of cpu,cuda (default: cpu, plus cuda when it runs)")
    s.add_argument("--precisions", default=None,
                   help="comma list (default: fp32,int8 on cpu; fp32,fp16 on cuda)")
    s.add_argument("--batch-sizes", default="1,8,32,128", help="comma list (default 1,8,32,128)")
    s.add_argument("--seq-lengths", default="16,64,256", help="tokens per text, comma list (default 16,64,256)")
    s.add_argument("--texts", type=int, default=256, help="texts per measurement, at least the batch size (256)")
    s.add_argument("--repeat", type=int, default=3, help="timed runs per cell; the median is kept (default 3)")
    s.add_argument("--latency-runs", type=int, default=200, help="single-text encodes for p50/p99 (default 200)")
    s.add_argument("--threads", type=int, default=None, help="ONNX Runtime (and torch) threads (default: all)")
    s.add_argument("--st", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure sentence-transformers when installed (default on)")
    s.add_argument("-o", "--output", default="bench-report", help="report folder (default bench-report/)")
    s.add_argument("--quiet", action="store_true", help="no per-cell lines on stderr")
    s.set_defaults(func=cmd_bench)
