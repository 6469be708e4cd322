"""What planning a batch costs the dynamic batcher: the time a worker holds the queue's lock to pick its batch.

Two parts, on real sentences tokenized by the model (token lengths as the server sees them):
1. The cost-planning DP of ``plan_by_cost`` (embfast/dynamic.py): its plain-Python form (used up to 64 x 64 steps)
   against its NumPy form (the reference, used above), for 1 to 128 texts, in this process.
2. ``DynamicBatcher._select`` (the whole pick: look-ahead pool, DP, bookkeeping) on queues of the shapes a server
   sees: one request of 1 or 8 texts, 8 or 32 single-text requests, 4 or 8 requests of 8 texts. With
   ``--baseline DIR`` (another build, ``pip install --no-deps --target DIR`` of an earlier commit) the same is
   measured in a subprocess running that build, in alternating rounds, so both builds see the same drift.

Medians of ``--repeats`` timings (microseconds) per round, then the median over rounds. Never asserts.

    python benchmarks/bench_plan.py
    python benchmarks/bench_plan.py --baseline /tmp/base --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SENTENCES = ROOT.parent / "shared" / "data" / "throughput" / "sentences.txt"
SHAPES = {"1x1": (1, 1), "1x8": (1, 8), "8x1": (8, 1), "32x1": (32, 1), "4x8": (4, 8), "8x8": (8, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", default=str(DEFAULT_SENTENCES), help="text file, one sentence per line")
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--repeats", type=int, default=300, help="timings per figure and round (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (alternating builds with --baseline; default 3)")
    p.add_argument("--baseline", default=None, metavar="DIR", help="also measure _select in this build")
    p.add_argument("--select-only", action="store_true", help=argparse.SUPPRESS)  # the baseline's subprocess
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.repeats < 10 or args.rounds < 1:
        p.error("--repeats must be >= 10 and --rounds >= 1")
    if args.baseline and not Path(args.baseline, "embfast").is_dir():
        p.error(f"--baseline {args.baseline!r} holds no embfast package")
    return args


def median_us(fn, repeats: int) -> float:
    """``fn()``'s median time over ``repeats`` single calls, in us."""
    return round(statistics.median(timeit.repeat(fn, number=1, repeat=repeats)) * 1e6, 2)


def measure_select(model, sentences: list[str], repeats: int) -> dict[str, float]:
    """``_select``'s median time (us) per queue shape: a fresh batcher (one worker, never started) with the shape's
    requests queued, the lock held as a worker holds it."""
    from embfast import DynamicBatcher

    out = {}
    for name, (requests, k) in SHAPES.items():
        times = []
        for rep in range(repeats):
            b = DynamicBatcher(model, max_queue=100000)  # one worker: a second would build a narrow twin session
            b._start_worker = lambda: None  # nobody takes the batch but this loop
            for r in range(requests):
                texts = [sentences[(rep * 97 + r * k + j) % len(sentences)] for j in range(k)]
                b._reserve()
                b._enqueue(*b._tokenize(texts, "", True))
            with b._cond:
                t0 = time.perf_counter()
                b._select()
                times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1e6, 2)
    return out


def measure_dp(lengths, repeats: int) -> list[dict]:
    import numpy as np

    from embfast.dynamic import _plan_starts_numpy, _plan_starts_python

    rows = []
    for n in (1, 2, 8, 16, 32, 64, 128):
        width = np.sort(np.maximum(np.asarray(lengths[:n], dtype=np.float64), 1))[::-1].copy()
        args = (width, 256, 16384, 32.0)
        if _plan_starts_python(*args) != _plan_starts_numpy(*args):  # a bug, not a timing: say so
            raise RuntimeError(f"the two DPs disagree on {n} texts")
        rows.append({"texts": n, "python_us": median_us(lambda a=args: _plan_starts_python(*a), repeats),
                     "numpy_us": median_us(lambda a=args: _plan_starts_numpy(*a), repeats)})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np

    from embfast import Embedder, build_info

    with open(args.sentences, encoding="utf-8") as fh:
        sentences = [line.strip() for line in fh if line.strip()][:5000]
    model = Embedder(args.model) if args.model else Embedder()
    if args.select_only:
        print(json.dumps(measure_select(model, sentences, args.repeats)))
        return 0
    header = {"bench": "plan", "build": build_info(), "repeats": args.repeats, "rounds": args.rounds,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    rows: list[dict] = []
    lengths = [len(ids) for ids in model.tokenizer.tokenize(sentences[:128]).ids]
    dp = [measure_dp(lengths, args.repeats) for _ in range(args.rounds)]
    for i, row in enumerate(dp[0]):
        rows.append({"bench": "plan", "part": "dp", "texts": row["texts"], "rounds": args.rounds,
                     **{k: round(float(np.median([d[i][k] for d in dp])), 2) for k in ("python_us", "numpy_us")}})
    builds = {"this build": [], **({"baseline": []} if args.baseline else {})}
    for _ in range(args.rounds):
        builds["this build"].append(measure_select(model, sentences, args.repeats))
        if args.baseline:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.baseline,
                                                                            os.environ.get("PYTHONPATH")]))}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--select-only", "--sentences", args.sentences,
                   "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else [])
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd="/")
            builds["baseline"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for build, runs in builds.items():
        for shape in SHAPES:
            rows.append({"bench": "plan", "part": "select", "build": build, "queue": shape, "rounds": args.rounds,
                         "select_us": round(float(np.median([r[shape] for r in runs])), 2)})
    out = open(args.json_out, "a", encoding="utf-8") if args.json_out else None  # noqa: SIM115
    for row in [header, *rows]:
        print(json.dumps(row))
        if out:
            out.write(json.dumps(row) + "\n")
    if out:
        out.close()
    print("\n| texts | DP, plain Python (us) | DP, NumPy (us) |\n|---|---|---|")
    for r in rows:
        if r["part"] == "dp":
            print(f"| {r['texts']} | {r['python_us']} | {r['numpy_us']} |")
    print("\n| queue (requests x texts) | " + " | ".join(f"_select, {b} (us)" for b in builds) + " |")
    print("|---|" + "---|" * len(builds))
    for shape in SHAPES:
        cells = [next(r["select_us"] for r in rows if r["part"] == "select" and r["build"] == b and r["queue"] == shape)
                 for b in builds]
        print(f"| {shape} | " + " | ".join(str(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
