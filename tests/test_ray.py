"""Ray Data on a real local cluster: one Embedder per actor, vectors equal a local encode, no row lost or doubled."""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embfast.benchcmd import sample_sentences
from embfast.integrations.ray import EmbedBatch, embed_dataset

ray = pytest.importorskip("ray")
N_TEXTS = 3000


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real-looking texts built from the bundled real sentences."""
    sents = sample_sentences()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(sents, 2)
        out.append([f"{a} {b}", f"Item {i}: {a}", f"{a[: rng.randint(12, len(a))].rstrip()} ({i})",
                    f"{b.lower()} Ref {i}."][i % 4])
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for this module (started once, shut down after)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_dataset_vectors_equal_local_encode(cluster, tiny):
    texts = corpus(N_TEXTS)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    out = embed_dataset(ds, model=str(tiny.model_dir), concurrency=2, num_cpus=1, batch_size=250, threads=1)
    rows = out.take_all()
    ids = [int(r["id"]) for r in rows]
    assert len(ids) == N_TEXTS and sorted(ids) == list(range(N_TEXTS))  # none lost, none doubled
    by_id = {int(r["id"]): r for r in rows}
    assert all(by_id[i]["text"] == texts[i] for i in range(N_TEXTS))
    got = np.stack([np.asarray(by_id[i]["embedding"], dtype=np.float32) for i in range(N_TEXTS)])
    np.testing.assert_allclose(got, tiny.encode(texts), rtol=1e-4, atol=1e-5)


def test_pandas_batches_on_the_cluster(cluster, tiny):
    texts = corpus(400, seed=1)
    ds = ray.data.from_items([{"id": i, "body": t} for i, t in enumerate(texts)])
    out = embed_dataset(ds, model=str(tiny.model_dir), concurrency=1, batch_size=100, batch_format="pandas",
                        text_column="body", output_column="vec", threads=1)
    df = out.to_pandas().sort_values("id")
    assert df["id"].tolist() == list(range(400))
    np.testing.assert_allclose(np.stack(df["vec"].to_list()), tiny.encode(texts), rtol=1e-4, atol=1e-5)


def test_example_script_writes_parquet(cluster, tiny, tmp_path):
    import pyarrow.parquet as pq

    texts = corpus(300, seed=2)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"doc": i, "text": t}) + "\n" for i, t in enumerate(texts)),
                                       encoding="utf-8")
    example = Path(__file__).resolve().parents[1] / "examples" / "ray_encode.py"
    r = subprocess.run([sys.executable, str(example), "in.jsonl", "-o", "vectors", "--address", cluster,
                        "--model", str(tiny.model_dir), "--concurrency", "1", "--batch-size", "100"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    table = pq.read_table(sorted(glob.glob(str(tmp_path / "vectors" / "*.parquet")))).to_pandas().sort_values("doc")
    assert table["doc"].tolist() == list(range(300))
    np.testing.assert_allclose(np.stack(table["embedding"].to_list()), tiny.encode(texts), rtol=1e-4, atol=1e-5)


def test_embed_batch_formats_and_errors(tiny):
    """The callable itself, as Ray calls it: numpy dict, pandas and pyarrow batches; clear errors."""
    import pandas as pd
    import pyarrow as pa

    fn = EmbedBatch(str(tiny.model_dir), threads=1)
    texts = corpus(5, seed=3)
    want = tiny.encode(texts)
    out = fn({"text": np.array(texts, dtype=object), "n": np.arange(5)})
    assert out["embedding"].shape == (5, 32) and out["n"].tolist() == list(range(5))
    np.testing.assert_allclose(out["embedding"], want, rtol=1e-4, atol=1e-5)
    df = fn(pd.DataFrame({"text": texts}))
    np.testing.assert_allclose(np.stack(df["embedding"].to_list()), want, rtol=1e-4, atol=1e-5)
    tbl = fn(pa.table({"text": texts}))
    np.testing.assert_allclose(np.asarray(tbl.column("embedding").to_pylist(), np.float32), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"batch must have a 'text' column \(text_column\), got columns \['body'\]"):
        fn({"body": np.array(["x"])})
    with pytest.raises(ValueError, match=r"column 'text'\[1\] is missing \(None or NaN\); every row needs a text"):
        fn(pd.DataFrame({"text": ["ok", None]}))
    with pytest.raises(TypeError, match=r"column 'text'\[0\] must be a str, got int"):
        fn({"text": np.array([3])})
    with pytest.raises(TypeError, match="batch must be a dict of numpy arrays, a pandas DataFrame or a pyarrow Table"):
        fn(["a list"])
    with pytest.raises(ValueError, match="concurrency must be an int >= 1, got 0"):
        embed_dataset(None, concurrency=0)
