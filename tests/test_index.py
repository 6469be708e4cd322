"""``embfast.Index`` and ``embfast index`` / ``embfast search``: search, persistence, integrity, model identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embfast import Embedder, kernels
from embfast.benchcmd import sample_sentences
from embfast.index import Index, IndexCorruptError, ModelMismatchError, read_index_manifest


def run_cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "embfast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy(), cwd=cwd)


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model (other weights, same name): loading an index built with ``tiny`` must refuse it."""
    from conftest import make_tiny_bert

    return Embedder(make_tiny_bert(tmp_path_factory.mktemp("other") / "tiny-bert", seed=1), threads=1)


# ---- the Python API -----------------------------------------------------------------------------------------------
def test_add_texts_and_search_texts(tiny):
    docs = sample_sentences()[:20]
    index = Index(tiny)
    index.add(docs[:10], metadata=[{"n": i} for i in range(10)])
    index.add(docs[10:])
    assert len(index) == 20 and index.dim == 32
    hits = index.search([docs[3], docs[15]], top_k=3)
    assert [h[0]["id"] for h in hits] == [3, 15]
    assert hits[0][0] == {"id": 3, "score": pytest.approx(1.0, abs=1e-5), "text": docs[3], "metadata": {"n": 3}}
    assert hits[1][0]["metadata"] is None and hits[1][0]["text"] == docs[15]
    assert [len(h) for h in hits] == [3, 3]
    assert [len(h) for h in index.search(docs[0], top_k=50)] == [20]  # k > n returns everything
    assert index.search(docs[0], top_k=0) == [[]]
    assert index.search([], top_k=3) == []
    assert Index(tiny).search("anything") == [[]]


@pytest.mark.parametrize("precision", ["fp32", "int8", "binary"])
def test_vector_search_matches_exact_topk(precision, tmp_path):
    corpus, queries = unit_rows(3000, 64, 0), unit_rows(5, 64, 1)
    index = Index(precision=precision)
    index.add(corpus, ids=[f"v{i}" for i in range(3000)], texts=[f"row {i}" for i in range(3000)])
    exact_s, exact_i = kernels.topk_cosine(queries, corpus, 10)
    hits = index.search(queries, top_k=10, rescore_multiplier=300)  # 300 x 10 candidates: all rows, rescored
    got_i = np.array([[int(h["id"][1:]) for h in row] for row in hits])
    np.testing.assert_allclose([[h["score"] for h in row] for row in hits], exact_s, rtol=1e-5, atol=1e-6)
    # the same top-k up to float noise: each returned row carries its own exact cosine (a near-tie may swap)
    true = (queries.astype(np.float64) @ corpus.T.astype(np.float64))
    np.testing.assert_allclose(np.take_along_axis(true, got_i, axis=1), exact_s, rtol=1e-5, atol=1e-5)
    if precision != "fp32":  # with the default 4 x k candidates the top hit of a corpus row is itself
        self_hits = index.search(corpus[:5], top_k=1)
        assert [row[0]["id"] for row in self_hits] == ["v0", "v1", "v2", "v3", "v4"]
        assert self_hits[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0][0]["text"] == f"row {got_i[0, 0]}"
    scores = np.array([[h["score"] for h in row] for row in hits])
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    raw = index.search(queries, top_k=3, rescore=False)
    assert [len(r) for r in raw] == [3] * 5

    path = index.save(tmp_path / "v.embf")
    for mmap in (True, False):
        loaded = Index.load(path, mmap=mmap)
        assert (len(loaded), loaded.dim, loaded.precision) == (3000, 64, precision)
        assert loaded.search(queries, top_k=10, rescore_multiplier=300) == hits


def test_save_load_add_save_again(tiny, tmp_path):
    docs = sample_sentences()
    path = tmp_path / "i.embf"
    index = Index(tiny, precision="int8")
    index.add(docs[:20], metadata=[{"i": i} for i in range(20)])
    index.save(path)
    loaded = Index.load(path, embedder=tiny)  # memory-mapped
    loaded.add(docs[20:30])
    assert [h["id"] for h in loaded.search(docs[25], top_k=1)[0]] == [25]
    loaded.save(path)  # over the file it is mapped from
    again = Index.load(path, embedder=tiny)
    assert len(again) == 30 and again.text_at(29) == docs[29] and again.metadata_at(3) == {"i": 3}
    assert again.metadata_at(25) is None
    man = read_index_manifest(path)
    assert man["count"] == 30 and man["model"]["name"] == "tiny-bert" and man["precision"] == "int8"
    assert man["int8_ranges_count"] == 20  # 30 rows: not yet doubled since calibration
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.embf"]  # no temporary files left


def test_add_refuses_bad_input(tiny):
    index = Index(tiny)
    index.add(["a b c"], ids=["x"])
    with pytest.raises(ValueError, match="ids must be unique, got 'x' which the index already holds"):
        index.add(["d"], ids=["x"])
    with pytest.raises(ValueError, match="ids must be given: this index has str ids"):
        index.add(["d"])
    with pytest.raises(TypeError, match="ids must be strs like the index's existing ids, got ints"):
        index.add(["d"], ids=[1])
    with pytest.raises(ValueError, match="ids must be unique, got duplicates within this add"):
        index.add(["d", "e"], ids=["y", "y"])
    with pytest.raises(ValueError, match=r"must have dim 32 \(this index's\), got shape \(1, 8\)"):
        index.add(np.ones((1, 8)), ids=["z"])
    with pytest.raises(ValueError, match="must be finite, got NaN or inf in row 1"):
        index.add(np.array([[1.0] * 32, [np.nan] * 32]), ids=["p", "q"])
    with pytest.raises(ValueError, match=r"metadata must be a list with one dict \(or None\) per row \(1\), got 2"):
        index.add(["d"], ids=["d"], metadata=[{}, {}])
    with pytest.raises(TypeError, match=r"metadata\[0\] must be JSON-serializable"):
        index.add(["d"], ids=["d"], metadata=[{"x": object()}])
    assert len(index) == 1
    ints = Index(tiny)
    ints.add(["a", "b"], ids=[5, 2])
    ints.add(["c"])
    assert [ints.id_at(i) for i in range(3)] == [5, 2, 6]  # automatic ids never reuse an explicit one
    with pytest.raises(TypeError, match=r"texts need an embedder: create the index with Index\(embedder\)"):
        Index().add(["text"])
    with pytest.raises(ValueError, match="precision must be one of fp32, int8, binary, got 'fp16'"):
        Index(precision="fp16")


# ---- integrity ----------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    index = Index(precision="binary")
    index.add(unit_rows(500, 48), texts=[f"t{i}" for i in range(500)])
    return index.save(tmp_path / "s.embf")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused(saved):
    man = read_index_manifest(saved)
    sec = man["sections"]["vectors"]
    _flip(saved, sec["offset"] + sec["nbytes"] // 2)
    with pytest.raises(IndexCorruptError, match=r"is corrupt: section 'vectors' fails its sha256 checksum"):
        Index.load(saved)
    _flip(saved, sec["offset"] + sec["nbytes"] // 2)  # undo: loads again
    Index.load(saved)
    size = saved.stat().st_size
    _flip(saved, size - 100)  # inside the manifest
    with pytest.raises(IndexCorruptError, match="its manifest fails its sha256 checksum"):
        Index.load(saved, verify=False)


def test_truncated_and_foreign_files_are_refused(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 3):
        saved.write_bytes(data[:cut])
        with pytest.raises(IndexCorruptError, match="truncated|not an embfast index"):
            Index.load(saved, verify=False)
    foreign = tmp_path / "f.embf"
    foreign.write_bytes(b"PK\x03\x04 a zip file, not an index" * 10)
    with pytest.raises(IndexCorruptError, match="is not an embfast index"):
        Index.load(foreign)
    with pytest.raises(FileNotFoundError, match="index not found"):
        Index.load(tmp_path / "none.embf")


def test_another_model_is_refused(tiny, tiny_dir, other_model, tmp_path):
    index = Index(tiny)
    index.add(["one text", "another text"])
    path = index.save(tmp_path / "m.embf")
    with pytest.raises(ModelMismatchError, match=r"was built with model 'tiny-bert' \(checksum [0-9a-f]{12}\), but the "
                                                 r"embedder is 'tiny-bert' \(checksum [0-9a-f]{12}\)"):
        Index.load(path, embedder=other_model)
    with pytest.raises(ModelMismatchError, match="holds vectors of dim 32, but the embedder makes dim 16"):
        Index.load(path, embedder=Embedder(tiny_dir, truncate_dim=16, threads=1))
    vectors_only = Index.load(path)  # no embedder: vectors only, with a hint for texts
    assert vectors_only.search(tiny.encode(["one text"]), top_k=1)[0][0]["id"] == 0
    with pytest.raises(TypeError, match="this index was built with model 'tiny-bert'"):
        vectors_only.search("one text")


# ---- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_build_search_add_info(tiny_dir, other_model, tmp_path):
    docs = sample_sentences()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n"
                                                   for i, t in enumerate(docs[:30])), encoding="utf-8")
    r = run_cli("index", "build", "corpus.jsonl", "--id-field", "id", "-o", "docs.embf", "--precision", "int8",
                "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "built docs.embf: 30 rows x 32, int8, model tiny-bert" in r.stdout

    r = run_cli("search", "docs.embf", docs[7], "-k", 2, cwd=tmp_path)  # the model comes from the manifest
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"query: {docs[7]}" and lines[1].startswith("  1. 1.0000  [doc7]  " + docs[7][:40])
    assert len(lines) == 3

    (tmp_path / "more.txt").write_text("\n".join(docs[30:35]) + "\n", encoding="utf-8")
    r = run_cli("index", "add", "docs.embf", "more.txt", "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and "ids must be given: this index has str ids" in r.stderr
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"id": f"more{i}", "text": t}) + "\n"
                                                 for i, t in enumerate(docs[30:35])), encoding="utf-8")
    r = run_cli("index", "add", "docs.embf", "more.jsonl", "--id-field", "id", "--model", tiny_dir, "--quiet",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "added 5 rows to docs.embf: 30 -> 35 rows" in r.stdout

    r = run_cli("search", "docs.embf", docs[33], "another query", "-k", 3, "--json", "--model", tiny_dir,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["query"] for o in out] == [docs[33], "another query"] and [len(o["hits"]) for o in out] == [3, 3]
    assert out[0]["hits"][0]["id"] == "more3" and out[0]["hits"][0]["text"] == docs[33]
    assert out[0]["hits"][0]["metadata"] == {"source": "more.jsonl:4"}

    r = run_cli("index", "info", "docs.embf", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["count"] == 35

    r = run_cli("search", "docs.embf", "q", "--model", other_model.manifest["source"], cwd=tmp_path)
    assert r.returncode == 2 and "was built with model 'tiny-bert'" in r.stderr

    path = tmp_path / "docs.embf"
    sec = read_index_manifest(path)["sections"]["texts.blob"]
    _flip(path, sec["offset"] + 3)
    r = run_cli("search", "docs.embf", "q", cwd=tmp_path)
    assert r.returncode == 2 and "is corrupt: section 'texts.blob' fails its sha256 checksum" in r.stderr
    path.write_bytes(path.read_bytes()[:-10])
    r = run_cli("search", "docs.embf", "q", cwd=tmp_path)
    assert r.returncode == 2 and "truncated" in r.stderr


def test_cli_build_with_chunks_and_binary(tiny_dir, tmp_path):
    docs = sample_sentences()
    (tmp_path / "long.txt").write_text(" ".join(docs[:12]) + "\n" + docs[12] + "\n", encoding="utf-8")
    r = run_cli("index", "build", "long.txt", "-o", "c.embf", "--precision", "binary", "--chunk-tokens", 20,
                "--chunk-overlap", 4, "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    index = Index.load(tmp_path / "c.embf")
    n = len(index)
    assert n > 5 and index.id_at(0) == "long.txt:1#0" and index.id_at(n - 1) == "long.txt:2#0"
    meta = index.metadata_at(1)
    assert meta["doc_id"] == "long.txt:1" and meta["chunk_index"] == 1 and meta["source"] == "long.txt:1"
    assert index.text_at(1) == (" ".join(docs[:12]))[meta["char_start"]:meta["char_end"]]
