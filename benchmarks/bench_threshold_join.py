"""The threshold self-join (near-duplicates, community detection), three ways on the same vectors, in rotated
order in one process:

- ``screen``: the int8 screen (exact integer products through ONNX Runtime, a proven bound, the candidates
  rescored in float32; :mod:`embfast.screen`), what ``upper_pairs`` runs by default on large joins;
- ``float32``: float32 score tiles (BLAS) and the native pairs scan (``screen=False``);
- ``float32-numpy``: float32 tiles and the NumPy reference scan (np.nonzero over each tile).

    python benchmarks/bench_threshold_join.py --vectors minilm-20000.npy --threshold 0.75 --repeat 4

``--vectors``: an (n, dim) .npy of embeddings (bench_apps.py caches the real sentences' as
``<cache>/minilm-<n>.npy``). Prints one JSON line per call, then the medians, the speed-ups over ``float32``
and whether every way found the same pairs (a pair may differ only at a float tie with the threshold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from embfast import kernels, mining

WAYS = ("screen", "float32", "float32-numpy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", required=True)
    p.add_argument("--threshold", type=float, default=0.75)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    args = p.parse_args(argv)
    x = mining.unit_rows(np.load(args.vectors))
    native = kernels.threshold_pairs

    def reference(scores, thr, row_offset=0, col_offset=0, upper=False):
        return native(scores, thr, row_offset=row_offset, col_offset=col_offset, upper=upper, backend="reference")

    times: dict[str, list[float]] = {w: [] for w in args.ways}
    pairs = {}
    try:
        for r in range(args.repeat):
            for way in args.ways[r % len(args.ways):] + args.ways[:r % len(args.ways)]:
                kernels.threshold_pairs = reference if way == "float32-numpy" else native
                t0 = time.perf_counter()
                i, j, s = mining.upper_pairs(x, args.threshold, screen=way == "screen")
                times[way].append(time.perf_counter() - t0)
                pairs[way] = (i, j, s)
                print(json.dumps({"way": way, "round": r, "seconds": round(times[way][-1], 4), "pairs": len(i)}),
                      flush=True)
    finally:
        kernels.threshold_pairs = native
    med = {k: statistics.median(v) for k, v in times.items()}
    base = args.ways[0] if "float32" not in med else "float32"
    sets = {w: set(zip(p[0].tolist(), p[1].tolist(), strict=True)) for w, p in pairs.items()}
    differ = {w: len(sets[w] ^ sets[base]) for w in sets}
    print(json.dumps({"rows": len(x), "threshold": args.threshold, "median_s": {k: round(v, 4) for k, v in med.items()},
                      "speedup_over_" + base: {k: round(med[base] / v, 3) for k, v in med.items()},
                      "pairs": len(sets[base]), "pairs_differing_from_" + base: differ}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
