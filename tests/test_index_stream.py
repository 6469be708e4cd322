"""Streaming ``embfast index build`` / ``index add``: same bytes as an in-memory build, --resume, flat memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embfast.benchcmd import sample_sentences
from embfast.index import Index, read_index_manifest
from embfast.jobs import work_folder


def run_cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "embfast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy(), cwd=cwd)


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def texts(n: int, start: int = 0) -> list[str]:
    sents = sample_sentences()
    return [f"{sents[i % len(sents)]} ({i})" for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[str], prefix: str, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{start + i}", "text": t}) + "\n" for i, t in enumerate(rows)),
                    encoding="utf-8")
    return path


def same_file(a: Path, b: Path) -> None:
    """Identical index files but for the manifest's creation time (and version string)."""
    ma, mb = read_index_manifest(a), read_index_manifest(b)
    for m in (ma, mb):
        m.pop("created")
    assert ma == mb
    end = max(s["offset"] + s["nbytes"] for s in ma["sections"].values())
    assert a.read_bytes()[:end] == b.read_bytes()[:end]


@pytest.mark.parametrize("precision", ["fp32", "int8", "binary"])
def test_streamed_build_and_add_equal_in_memory_bytes(tiny, tiny_dir, tmp_path, precision):
    """--vectors plus the records' ids / texts, built in shards of 7, then added to twice: the files equal
    Index.save of the same rows (int8: the second add more than doubles the index, so ranges are rebuilt)."""
    dim = tiny.dim
    sizes = [(0, 61), (61, 23), (84, 150)]  # build, add (no int8 re-calibration), add (re-calibration)
    vecs = unit_rows(234, dim, seed=3) * 3.0
    mem = Index(tiny, precision=precision)
    for k, (s, n) in enumerate(sizes):
        np.save(tmp_path / f"v{k}.npy", vecs[s:s + n])
        write_jsonl(tmp_path / f"c{k}.jsonl", texts(n, s), "doc", s)
        mem.add(vecs[s:s + n], ids=[f"doc{i}" for i in range(s, s + n)], texts=texts(n, s),
                metadata=[{"source": f"c{k}.jsonl:{i + 1}"} for i in range(n)])
        mem.save(tmp_path / f"mem{k}.embf")
        if k == 0:
            r = run_cli("index", "build", f"c{k}.jsonl", "--vectors", f"v{k}.npy", "--id-field", "id", "-o",
                        "s.embf", "--precision", precision, "--shard-size", 7, "--model", tiny_dir, "--quiet",
                        cwd=tmp_path)
            assert f"built s.embf: {n} rows x {dim}, {precision}" in r.stdout, r.stderr
        else:
            r = run_cli("index", "add", "s.embf", f"c{k}.jsonl", "--vectors", f"v{k}.npy", "--id-field", "id",
                        "--shard-size", 7, "--model", tiny_dir, "--quiet", cwd=tmp_path)
            assert f"added {n} rows to s.embf: {s} -> {s + n} rows" in r.stdout, r.stderr
        assert not work_folder(tmp_path / "s.embf").exists()
        same_file(tmp_path / "s.embf", tmp_path / f"mem{k}.embf")
    index = Index.load(tmp_path / "s.embf", embedder=tiny)
    assert len(index) == 234 and index.id_at(100) == "doc100" and index.text_at(100) == texts(1, 100)[0]
    assert index.search(vecs[200], top_k=1)[0][0]["id"] == "doc200"
    if precision == "int8":
        assert read_index_manifest(tmp_path / "s.embf")["int8_ranges_count"] == 234

    # ids repeating across shards (or against the index) are refused before anything is written
    write_jsonl(tmp_path / "dup.jsonl", texts(3), "doc", 5)
    r = run_cli("index", "add", "s.embf", "dup.jsonl", "--id-field", "id", "--model", tiny_dir, "--quiet",
                cwd=tmp_path)
    assert r.returncode == 2 and "ids must be unique, got 'doc5' twice" in r.stderr
    same_file(tmp_path / "s.embf", tmp_path / "mem2.embf")


def test_streamed_text_build_matches_in_memory_index(tiny, tiny_dir, tmp_path):
    docs = texts(90)
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    r = run_cli("index", "build", "docs.txt", "-o", "t.embf", "--shard-size", 16, "--model", tiny_dir, "--quiet",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = Index.load(tmp_path / "t.embf", embedder=tiny)
    want = Index(tiny)
    want.add(docs, metadata=[{"source": f"docs.txt:{i + 1}"} for i in range(90)])
    np.testing.assert_allclose(np.asarray(got._vectors.full()), want._vectors.full(), atol=2e-6)
    assert [got.id_at(i) for i in range(90)] == list(range(90))
    assert [got.text_at(i) for i in range(90)] == docs
    assert [got.metadata_at(i) for i in range(90)] == [want.metadata_at(i) for i in range(90)]
    # int ids continue after the largest; an index with int ids refuses str ids
    (tmp_path / "more.txt").write_text("one more text\n", encoding="utf-8")
    r = run_cli("index", "add", "t.embf", "more.txt", "--no-text", "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and "90 -> 91 rows" in r.stdout, r.stderr
    got = Index.load(tmp_path / "t.embf")
    assert got.id_at(90) == 90 and got.text_at(90) is None and got.text_at(89) == docs[89]
    write_jsonl(tmp_path / "s.jsonl", ["x"], "a")
    r = run_cli("index", "add", "t.embf", "s.jsonl", "--id-field", "id", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "ids must be ints like the index's existing ids" in r.stderr


def test_killed_build_resumes_to_the_identical_file(tiny_dir, tmp_path):
    docs = texts(3000)
    (tmp_path / "big.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    args = ("index", "build", "big.txt", "-o", "r.embf", "--precision", "int8", "--shard-size", 200,
            "--model", tiny_dir, "--threads", 1, "--quiet")
    proc = subprocess.Popen([sys.executable, "-m", "embfast.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy(), cwd=tmp_path)
    state = work_folder(tmp_path / "r.embf") / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["shards"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = json.loads(state.read_text())["shards"]
    assert 1 <= len(done) < 15, "the build must be stopped mid-way"
    assert not (tmp_path / "r.embf").exists()
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "pass --resume to finish it" in r.stderr
    r = run_cli(*("fp32" if a == "int8" else a for a in args), "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "settings differ" in r.stderr
    r = run_cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resumed after {len(done)} shards" in r.stdout
    assert not work_folder(tmp_path / "r.embf").exists()
    r = run_cli(*[a if a != "r.embf" else "full.embf" for a in args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    same_file(tmp_path / "r.embf", tmp_path / "full.embf")


def test_interrupted_add_resumes_through_the_python_api(tiny, tmp_path, monkeypatch):
    """index add stopped after two shards (a simulated Ctrl-C) keeps the base file and its work folder;
    resume=True finishes it: the same file as an uninterrupted add (int8, ranges kept)."""
    from embfast import index_build

    vecs = unit_rows(200, tiny.dim, seed=5)
    np.save(tmp_path / "base.npy", vecs[:120])
    np.save(tmp_path / "more.npy", vecs[120:])
    for name in ("a.embf", "b.embf"):
        index_build.build_index([], tmp_path / name, tiny, precision="int8", vectors=tmp_path / "base.npy")
    before = (tmp_path / "a.embf").read_bytes()
    real = index_build._write_index_shard
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(index_build, "_write_index_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        index_build.build_index([], tmp_path / "a.embf", tiny, base=tmp_path / "a.embf",
                                vectors=tmp_path / "more.npy", shard_size=16)
    monkeypatch.setattr(index_build, "_write_index_shard", real)
    assert (tmp_path / "a.embf").read_bytes() == before
    assert len(json.loads((work_folder(tmp_path / "a.embf") / "state.json").read_text())["shards"]) == 2
    with pytest.raises(ValueError, match="pass --resume"):
        index_build.build_index([], tmp_path / "a.embf", tiny, base=tmp_path / "a.embf",
                                vectors=tmp_path / "more.npy", shard_size=16)
    res = index_build.build_index([], tmp_path / "a.embf", tiny, base=tmp_path / "a.embf",
                                  vectors=tmp_path / "more.npy", shard_size=16, resume=True)
    assert (res.rows, res.added, res.resumed_shards) == (200, 80, 2)
    index_build.build_index([], tmp_path / "b.embf", tiny, base=tmp_path / "b.embf", vectors=tmp_path / "more.npy")
    same_file(tmp_path / "a.embf", tmp_path / "b.embf")
    assert not work_folder(tmp_path / "a.embf").exists()
    assert Index.load(tmp_path / "a.embf").id_at(199) == 199


_RSS_SCRIPT = """
import sys
from embfast.index_build import build_index

class Model:  # what a build from precomputed vectors reads of its embedder (no model loaded: a small baseline)
    manifest = {"name": "stub", "source_checksum": "0", "source": None}
    dim, precision, max_seq_length, truncate_dim = 32, "fp32", 128, None

res = build_index([sys.argv[1]], sys.argv[2], Model(), precision="int8", vectors=sys.argv[3], quiet=True)
# VmHWM: this process image's peak RSS (ru_maxrss would keep the pytest parent's, inherited through fork + exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(res.rows, hwm // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_stays_flat_as_the_corpus_grows(tmp_path):
    """Peak RSS of a streamed build (vectors + ids + texts, int8 codes) at 20k and 200k rows, measured in a
    subprocess: the 10x larger corpus (23 MB more vectors, 10 MB more text; an in-memory build holds them
    all) may cost at most 12 MB more."""
    dim = 32
    peaks = {}
    for n in (20_000, 200_000):
        np.save(tmp_path / f"v{n}.npy", unit_rows(n, dim, seed=n))
        sents = sample_sentences()
        (tmp_path / f"t{n}.txt").write_text("".join(f"{sents[i % len(sents)][:50]} {i}\n" for i in range(n)),
                                            encoding="utf-8")
        r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, f"t{n}.txt", f"i{n}.embf", f"v{n}.npy"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        rows, peak = map(int, r.stdout.split())
        assert rows == n
        peaks[n] = peak
    assert peaks[200_000] < peaks[20_000] + 12, peaks
    index = Index.load(tmp_path / "i200000.embf")
    assert len(index) == 200_000 and index.text_at(199_999).endswith(" 199999")
