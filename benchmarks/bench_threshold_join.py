"""The threshold self-join (near-duplicates, community detection) with the native pairs scan against the NumPy
reference (np.nonzero over each score tile), alternating in one process on the same vectors.

    python benchmarks/bench_threshold_join.py --vectors minilm-20000.npy --threshold 0.75 --repeat 4

``--vectors``: an (n, dim) .npy of embeddings (bench_apps.py caches the real sentences' as
``<cache>/minilm-<n>.npy``). Prints one JSON line per call and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from embfast import kernels, mining


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", required=True)
    p.add_argument("--threshold", type=float, default=0.75)
    p.add_argument("--repeat", type=int, default=4)
    args = p.parse_args(argv)
    x = mining.unit_rows(np.load(args.vectors))
    native = kernels.threshold_pairs

    def reference(scores, thr, row_offset=0, col_offset=0, upper=False):
        return native(scores, thr, row_offset=row_offset, col_offset=col_offset, upper=upper, backend="reference")

    times: dict[str, list[float]] = {"native": [], "reference": []}
    pairs = {}
    try:
        for r in range(args.repeat):
            for name in ("native", "reference") if r % 2 == 0 else ("reference", "native"):
                kernels.threshold_pairs = native if name == "native" else reference
                t0 = time.perf_counter()
                i, j, s = mining.upper_pairs(x, args.threshold)
                times[name].append(time.perf_counter() - t0)
                pairs[name] = (i, j, s)
                print(json.dumps({"scan": name, "round": r, "seconds": round(times[name][-1], 4), "pairs": len(i)}))
    finally:
        kernels.threshold_pairs = native
    same = all(np.array_equal(a, b) for a, b in zip(pairs["native"], pairs["reference"], strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"rows": len(x), "threshold": args.threshold, "median_s": {k: round(v, 4) for k, v in med.items()},
                      "speedup": round(med["reference"] / med["native"], 3), "same_pairs": same}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
