"""Embed files with Ray Data on a Ray cluster (or a local one) and write parquet.

    python examples/ray_encode.py 'docs/*.jsonl' -o vectors/ --concurrency 4
    python examples/ray_encode.py corpus.parquet -o vectors/ --address ray://head:10001 --num-gpus 1

Inputs: .txt (one text per line), .jsonl, .csv or .parquet with a text column (--text-field).
Output: a folder of parquet files with the input's columns plus "embedding" (float32 vectors).
Every node needs embfast installed and the model folder at the same path (or the bundled model).
"""

from __future__ import annotations

import argparse
import glob
import os


def read(paths: list[str], text_field: str):
    """A Ray Dataset over the files, with their text in a "text" column."""
    import ray.data

    exts = {os.path.splitext(p)[1].lower() for p in paths}
    if len(exts) != 1:
        raise SystemExit(f"inputs must share one extension, got {sorted(exts)}")
    ext = exts.pop()
    if ext == ".txt":
        ds = ray.data.read_text(paths)  # column "text", one row per line
        return ds.filter(lambda row: bool(row["text"].strip()))
    reader = {".jsonl": ray.data.read_json, ".csv": ray.data.read_csv, ".parquet": ray.data.read_parquet}.get(ext)
    if reader is None:
        raise SystemExit(f"inputs must be .txt, .jsonl, .csv or .parquet, got {ext}")
    ds = reader(paths)
    if text_field != "text":
        ds = ds.rename_columns({text_field: "text"})
    return ds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files or glob patterns")
    p.add_argument("-o", "--output", required=True, help="output folder (parquet files)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--model", default=os.environ.get("EMBFAST_MODEL"), help="model folder (default: bundled)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--concurrency", type=int, default=2, help="embedding actors (default 2)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default 0: CPU)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per Ray batch (default 256)")
    args = p.parse_args(argv)

    import ray

    from embfast.integrations.ray import embed_dataset

    # Ray workers do not share this process's working folder: local paths must be absolute.
    local = lambda p: p if "://" in p else os.path.abspath(p)  # noqa: E731
    paths = sorted({local(f) for pat in args.inputs for f in (glob.glob(pat) or [pat])})
    output = local(args.output)
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    try:
        ds = embed_dataset(read(paths, args.text_field), model=args.model, concurrency=args.concurrency,
                           num_cpus=args.num_cpus, num_gpus=args.num_gpus, batch_size=args.batch_size)
        ds.write_parquet(output)
        print(f"wrote {output}: {len(glob.glob(os.path.join(output, '*.parquet')))} parquet files")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
