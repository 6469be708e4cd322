"""The CLI as a user runs it (subprocesses), and the evaluation metrics against known values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from embfast.evaluation import ndcg_at_k, rankdata, spearman


def run_cli(*args, timeout=600):
    """Run the installed CLI from a neutral folder (so the source tree is not imported instead)."""
    return subprocess.run([sys.executable, "-m", "embfast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy(), cwd=tempfile.gettempdir())


def test_info_prints_build_facts():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {"native", "version", "onnxruntime", "providers", "isa", "openmp"} <= set(info)


def test_spearman_and_ranks_match_scipy():
    from scipy.stats import rankdata as sp_rank
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, 200).astype(float)  # many ties
    b = a + rng.standard_normal(200)
    np.testing.assert_allclose(rankdata(a), sp_rank(a))
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_ndcg_known_values():
    assert ndcg_at_k(["a", "b"], {"a": 1}, 10) == 1.0
    assert ndcg_at_k(["b", "a"], {"a": 1}, 10) == pytest.approx(1 / np.log2(3))
    assert ndcg_at_k(["x", "y"], {"a": 1}, 10) == 0.0


def test_eval_commands_on_small_files(tiny_dir, tmp_path):
    sts = tmp_path / "sts.jsonl"
    pairs = [("A man plays guitar.", "A person plays an instrument.", 4.0), ("A cat sleeps.", "Stocks fell.", 0.2),
             ("Kids play football.", "Children play soccer.", 4.5), ("It rains.", "The sun shines.", 1.0)]
    sts.write_text("\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) for a, b, s in pairs))
    r = run_cli("eval", "sts", sts, "--model", tiny_dir)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["pairs"] == 4 and -1 <= res["cosine_spearman"] <= 1

    beir = tmp_path / "beir"
    beir.mkdir()
    docs = ["cats are small furry pets", "the stock market crashed", "football is a team sport"]
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "title": "", "text": t})
                                                 for i, t in enumerate(docs)))
    (beir / "queries_test.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": t})
                                                       for i, t in enumerate(docs)))
    (beir / "qrels_test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(3)))
    r = run_cli("eval", "retrieval", beir, "--model", tiny_dir)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    # every query is its own document: a faithful engine ranks it first
    assert res["queries"] == 3 and res["ndcg_at_10"] == pytest.approx(1.0)


def test_cli_errors_are_clear(tmp_path):
    r = run_cli("eval", "sts", tmp_path / "missing.jsonl", "--model", tmp_path / "nope")
    assert r.returncode == 2 and "model not found" in r.stderr


@pytest.mark.slow
def test_demo_runs_on_the_bundled_model():
    r = run_cli("demo", "--limit", "20")
    assert r.returncode == 0, r.stderr
    assert "texts/s" in r.stdout and "query: where did the cat sit?" in r.stdout
