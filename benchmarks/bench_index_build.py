"""Peak memory of streaming index builds (issue 13): ``embfast index build`` at growing corpus sizes.

Encoding millions of sentences takes hours on a small CPU, so the large builds index precomputed
vectors (``embfast index build TEXTS --vectors V.npy``: the texts and ids come from TEXTS, the
vectors from the .npy, nothing is embedded) made by tiling one real encode of the sentences:

    embfast encode /work/shared/data/throughput/sentences.txt -o sent88k.npy --precision int8 --normalize
    python benchmarks/bench_index_build.py tile sent88k.npy /work/shared/data/throughput/sentences.txt 2000000 out/
    python benchmarks/bench_index_build.py run out/t2000000.txt --vectors out/v2000000.npy -o out/i2m.embf \\
        --precision int8

``run`` runs the CLI under ``/usr/bin/time -v`` (a separate small process, so the peak RSS is the
build's own) and prints one JSON line: rows, seconds, peak RSS (MiB), file size. Any further
arguments go to ``embfast index build`` as they are.

``inmem TEXTS VECTORS OUT PRECISION`` measures the same way the in-memory path that the streaming
build replaced (``Index.add`` of 4,096 rows at a time, then ``Index.save``), for comparison:

    python benchmarks/bench_index_build.py inmem out/t200000.txt out/v200000.npy out/mem.embf int8
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def tile(vectors: str, texts: str, rows: int, out: str) -> None:
    """Write ``out/v<rows>.npy`` and ``out/t<rows>.txt``: the vectors and lines repeated to ``rows`` rows."""
    import numpy as np

    src = np.load(vectors, mmap_mode="r")
    lines = Path(texts).read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) != src.shape[0]:
        raise SystemExit(f"{texts} has {len(lines)} lines but {vectors} has {src.shape[0]} rows")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    dst = np.lib.format.open_memmap(outdir / f"v{rows}.npy", mode="w+", dtype=np.float32, shape=(rows, src.shape[1]))
    n = src.shape[0]
    with open(outdir / f"t{rows}.txt", "w", encoding="utf-8") as fh:
        for s in range(0, rows, n):
            e = min(s + n, rows)
            dst[s:e] = src[:e - s]
            fh.writelines(lines[:e - s])
    dst.flush()
    del dst


def inmem(texts: str, vectors: str, out: str, precision: str) -> None:
    """The in-memory build: Index.add per 4,096 rows (ids, texts, metadata as the CLI stores them), then save."""
    import numpy as np

    from embfast import Embedder
    from embfast.index import Index

    v = np.load(vectors, mmap_mode="r")
    lines = Path(texts).read_text(encoding="utf-8").splitlines()
    index = Index(Embedder(), precision=precision)
    for s in range(0, v.shape[0], 4096):
        e = min(s + 4096, v.shape[0])
        index.add(np.array(v[s:e]), ids=np.arange(s, e), texts=lines[s:e],
                  metadata=[{"source": f"{texts}:{i + 1}"} for i in range(s, e)])
    del lines
    index.save(out)
    print(f"built {out}: {len(index)} rows x {index.dim}")


def run(args: list[str], command: list[str] | None = None) -> dict:
    command = command or [sys.executable, "-m", "embfast.cli", "index", "build", *args]
    # EMBFAST_REQUIRE_NATIVE: run from this repository, `python -m` would import its source tree (no compiled core)
    r = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                       env={**os.environ, "EMBFAST_REQUIRE_NATIVE": "1"})
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    out = Path(args[args.index("-o") + 1])
    rows = int(re.search(r": (\d+) rows x", r.stdout).group(1))
    return {"rows": rows, "seconds": round(secs, 1), "peak_rss_mib": round(rss_kb / 1024, 1),
            "file_mib": round(out.stat().st_size / 2**20, 1), "args": args, "stdout": r.stdout.strip()}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "tile" and len(sys.argv) == 6:
        tile(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) >= 3 and sys.argv[1] == "run":
        print(json.dumps(run(sys.argv[2:])))
    elif len(sys.argv) == 6 and sys.argv[1] == "inmem":
        print(json.dumps(run(["-o", sys.argv[4]], [sys.executable, __file__, "_inmem", *sys.argv[2:]])))
    elif len(sys.argv) == 6 and sys.argv[1] == "_inmem":
        inmem(*sys.argv[2:])
    else:
        raise SystemExit(__doc__)
