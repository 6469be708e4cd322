"""What people build on embeddings, as a user runs it: `embfast dedup` (with --resume), `embfast cluster`,
recommendation by example (Index.recommend, `embfast search --positive`, POST /v1/search), and the
interactive map (`embfast viz --html`) opened in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from test_jobs import run_cli, write_lines
from test_server import serve

from embfast import Index, mining
from embfast.kernels import reference
from embfast.server import create_app

BASE = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "How do I reset my password?",
        "The new phone has a great camera.", "Heavy rain is expected this weekend.",
        "She plays the violin in an orchestra.", "Our flight to Tokyo was delayed by three hours.",
        "Add two cups of flour and stir well.", "The museum opens at nine in the morning.",
        "Quantum computers use qubits instead of bits."]


def corpus_with_duplicates() -> list[str]:
    """The base sentences, exact copies, near copies (case, punctuation, one word) and unrelated texts."""
    texts = list(BASE)
    texts += [BASE[0], BASE[1].lower(), BASE[2].rstrip("?"), "The cat sat on the mat!", BASE[3].upper()]
    texts += [f"Unrelated note number {i}: {w}" for i, w in enumerate(["apples", "trains", "poetry", "tax law"])]
    return texts


def expected_dedup(m, texts: list[str], threshold: float) -> tuple[list[str], list[list[int]]]:
    v = m.encode(texts)
    i, j, _ = mining.near_duplicate_pairs(v, threshold)
    groups = mining.duplicate_groups(len(texts), i, j)
    drop = {r for g in groups for r in g[1:]}
    return [t for r, t in enumerate(texts) if r not in drop], groups


def test_dedup_cli_keeps_the_first_of_each_group(minilm_dir, minilm, tmp_path):
    texts = corpus_with_duplicates()
    write_lines(tmp_path / "texts.txt", texts)
    r = run_cli("dedup", "texts.txt", "--threshold", 0.92, "-o", "unique.txt", "--groups", "groups.jsonl",
                "--model", minilm_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    kept, groups = expected_dedup(minilm, texts, 0.92)
    assert (tmp_path / "unique.txt").read_text("utf-8").splitlines() == kept
    assert len(groups) >= 3 and [0, 10, 13] in groups  # the exact copy and "!" of the first sentence
    lines = [json.loads(line) for line in (tmp_path / "groups.jsonl").read_text("utf-8").splitlines()]
    assert [[m["row"] for m in g["members"]] for g in lines] == groups
    assert all(g["keep"] == f"texts.txt:{g['members'][0]['row'] + 1}" and g["members"][0]["score"] == 1.0
               for g in lines)
    assert f"{len(texts)} texts: kept {len(kept)}, removed {len(texts) - len(kept)}" in r.stdout
    assert not (tmp_path / "unique.txt.parts").exists(), "the work folder goes once the output is written"


def test_dedup_cli_through_the_int8_screen_finds_the_float32_groups(minilm_dir, minilm, tmp_path):
    """2,400 texts (a join of 5.8M scores: embfast dedup screens it in int8, its rows quantized once for every
    part): the same groups as the plain float32 join of the same vectors."""
    import itertools

    subjects = ["The cat", "A dog", "My neighbour", "The old man", "Our teacher", "The pilot", "A child", "The band"]
    verbs = ["sleeps on", "looks at", "paints", "walks past", "talks about", "repairs"]
    objects = ["the red car", "a small boat", "the garden wall", "an old piano", "the city bridge",
               "a wooden chair", "the kitchen door", "a blue bicycle", "the harbour", "a quiet library"]
    endings = [".", "!", " today.", " again.", " at night."]
    texts = [f"{s} {v} {o}{e}" for s, v, o, e in itertools.product(subjects, verbs, objects, endings)][:2400]
    write_lines(tmp_path / "t.txt", texts)
    r = run_cli("dedup", "t.txt", "--threshold", 0.9, "-o", "u.txt", "--model", minilm_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    x = mining.unit_rows(minilm.encode(texts))
    assert mining.use_screen(x, 0, len(texts))
    i, j, _ = mining.upper_pairs(x, 0.9, screen=False)
    groups = mining.duplicate_groups(len(texts), i, j)
    drop = {r for g in groups for r in g[1:]}
    assert 100 < len(drop) < 2300
    assert (tmp_path / "u.txt").read_text("utf-8").splitlines() == [t for k, t in enumerate(texts) if k not in drop]


def test_dedup_resume_uses_the_finished_work(tiny_dir, tiny, tmp_path):
    texts = [f"sentence {i} " + "word " * (i % 5) for i in range(30)] + ["sentence 3 word word word "]
    write_lines(tmp_path / "t.txt", texts)
    args = ("dedup", "t.txt", "--threshold", 0.999, "-o", "u.jsonl", "--model", tiny_dir, "--quiet")
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = (tmp_path / "u.jsonl").read_text("utf-8")
    assert json.loads(first.splitlines()[0]) == {"id": "t.txt:1", "text": texts[0]}
    assert "t.txt:31" not in first  # an exact copy of line 4
    # an interrupted run: the same command finds its work folder and refuses until told to --resume
    folder = tmp_path / "u.jsonl.parts"
    folder.mkdir()
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "pass --resume to finish it" in r.stderr
    r = run_cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "u.jsonl").read_text("utf-8") == first
    # a resumed run reads the join blocks it finished instead of recomputing them: plant a block that says
    # rows 0 and 1 are duplicates, and row 1 disappears
    folder.mkdir()
    run_cli("encode", "t.txt", "-o", str(folder / "vectors.npy"), "--normalize", "--model", tiny_dir, "--quiet",
            cwd=tmp_path)
    (folder / "dedup.json").unlink(missing_ok=True)
    np.savez(folder / "pairs-000000000000.npz", i=np.array([0]), j=np.array([1]), s=np.array([0.5], np.float32))
    r = run_cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\"t.txt:2\"" not in (tmp_path / "u.jsonl").read_text("utf-8")
    # changed inputs are refused on resume
    folder.mkdir()
    (folder / "dedup.json").write_text(json.dumps({"format": 1, "threshold": 0.5}), encoding="utf-8")
    r = run_cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "changed since the interrupted run" in r.stderr


def test_dedup_refuses_what_it_cannot_write(tiny_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "two\\nlines"}\n{"text": "one"}\n', encoding="utf-8")
    r = run_cli("dedup", "d.jsonl", "-o", "u.txt", "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and "d.jsonl:1: the text holds a line break" in r.stderr
    r = run_cli("dedup", "d.jsonl", "-o", "u.csv", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "output must end in .txt or .jsonl" in r.stderr


def topic_vectors(n: int = 240, topics: int = 4, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, 24)).astype(np.float32)
    words = [["market", "stocks", "shares"], ["football", "goal", "league"], ["flour", "oven", "bake"],
             ["rain", "storm", "weather"]]
    t = rng.integers(0, topics, n)
    x = centres[t] + 0.15 * rng.standard_normal((n, 24)).astype(np.float32)
    texts = [f"{' '.join(rng.choice(words[k], 3))} report {i}" for i, k in enumerate(t)]
    return x, texts


def test_cluster_cli(tmp_path):
    x, texts = topic_vectors()
    np.save(tmp_path / "v.npy", x)
    write_lines(tmp_path / "t.txt", texts)
    r = run_cli("cluster", "v.npy", "--texts", "t.txt", "--threshold", 0.8, "--min-community-size", 10,
                "-o", "c.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text("utf-8").splitlines()]
    comms = mining.community_detection(x, 0.8, 10)
    assert [sorted(c["members"]) for c in got] == [sorted(c) for c in comms] and len(got) == 4
    topics = [{"market", "stocks", "shares"}, {"football", "goal", "league"}, {"flour", "oven", "bake"},
              {"rain", "storm", "weather"}]
    assert sorted(topics.index(set(c["keywords"][:3])) for c in got) == [0, 1, 2, 3]  # each topic's own words
    for c in got:
        assert all(texts[e["row"]] == e["text"] for e in c["central"])
    r = run_cli("cluster", "v.npy", "--method", "kmeans", "--k", 4, "-o", "k.jsonl", cwd=tmp_path)
    assert r.returncode == 0 and "4 clusters (kmeans)" in r.stdout, r.stderr
    r = run_cli("cluster", "v.npy", "--method", "kmeans", "-o", "k.jsonl", cwd=tmp_path)
    assert r.returncode == 2 and "needs k" in r.stderr


# ---- recommendation by example ------------------------------------------------------------------------------
def expected_recommend(x: np.ndarray, pos: list[int], neg: list[int], k: int) -> list[int]:
    u = reference.l2_normalize(x).astype(np.float64)
    q = u[pos].mean(0) if not neg else 2 * u[pos].mean(0) - u[neg].mean(0)
    scores = u @ (q / np.linalg.norm(q))
    order = [int(i) for i in np.lexsort((np.arange(len(u)), -scores)) if i not in set(pos) | set(neg)]
    return order[:k]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_index_recommend(precision):
    x, _ = topic_vectors()
    index = Index(precision=precision)
    index.add(x, ids=[f"doc{i}" for i in range(len(x))])
    for pos, neg in (([0], []), ([0, 5, 9], []), ([0, 5], [1, 2])):
        hits = index.recommend([f"doc{i}" for i in pos], [f"doc{i}" for i in neg], top_k=8)
        want = expected_recommend(x, pos, neg, 8)
        assert [h["id"] for h in hits] == [f"doc{i}" for i in want]
    with pytest.raises(KeyError, match="positive: id 'nope' is not in this index"):
        index.recommend(["nope"])
    with pytest.raises(ValueError, match="positive must name at least one id"):
        index.recommend([])


def test_recommend_cli_and_server(tiny_dir, tiny, tmp_path):
    texts = [f"{w} topic sentence {i}" for i, w in enumerate(["cats", "dogs", "stocks", "bonds", "rain"] * 6)]
    write_lines(tmp_path / "t.txt", texts)
    r = run_cli("index", "build", "t.txt", "-o", "t.embf", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    index = Index.load(tmp_path / "t.embf", embedder=tiny)
    want = index.recommend([0, 5], [2], top_k=4)
    r = run_cli("search", "t.embf", "--positive", "0", "5", "--negative", "2", "-k", 4, "--json", "--model",
                tiny_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [h["id"] for h in json.loads(r.stdout)[0]["hits"]] == [h["id"] for h in want]
    r = run_cli("search", "t.embf", "--positive", "999", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "id 999 is not in this index" in r.stderr

    vectors = tiny.encode(texts)
    with serve(create_app(tiny, corpus=tmp_path / "t.embf")) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        body = c.post("/v1/search", json={"positive": [0, 5], "negative": [2], "top_k": 4}).json()
        assert [h["id"] for h in body["data"][0]["hits"]] == [h["id"] for h in want]
        for bad, field in (({"positive": [999]}, "positive"), ({"positive": []}, "positive"),
                           ({"positive": [0], "negative": [-3]}, "negative"), ({"positive": "0"}, "positive"),
                           ({"positive": [0], "query": "x"}, "query")):
            r = c.post("/v1/search", json=bad)
            assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
    np.save(tmp_path / "v.npy", vectors)
    with serve(create_app(tiny, corpus=tmp_path / "v.npy", corpus_texts=texts)) as (url, _), \
            httpx.Client(base_url=url, timeout=60) as c:
        hits = c.post("/v1/search", json={"positive": [0, 5], "negative": [2], "top_k": 4}).json()["data"][0]["hits"]
        assert [h["id"] for h in hits] == expected_recommend(vectors, [0, 5], [2], 4)
        assert hits[0]["text"] == texts[hits[0]["id"]]


# ---- the map in a real browser -----------------------------------------------------------------------------------
def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None and os.environ.get("EMBFAST_REQUIRE_BROWSER") == "1":
        pytest.fail("EMBFAST_REQUIRE_BROWSER=1 but no Chromium is installed (apt-get install chromium)")
    return found


def _open(browser: str, page, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *extra, page.as_uri()], capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.parametrize("method", ["pca", "umap", "tsne"])
def test_viz_html_map_opens_in_a_browser(tmp_path, method):
    browser = _chromium()
    x, texts = topic_vectors(n=160)
    np.save(tmp_path / "v.npy", x)
    write_lines(tmp_path / "t.txt", texts)
    r = run_cli("viz", "v.npy", "--method", method, "--color-by", "cluster", "--texts", "t.txt",
                "--threshold", 0.8, "--min-community-size", 10, "-o", "map.png", "--html", "map.html", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"160 points ({method}, 4 colours)" in r.stdout
    html = (tmp_path / "map.html").read_text("utf-8")
    assert "<script" in html and 'src="http' not in html  # plotly's JavaScript embedded: the page opens offline
    assert texts[0] in html  # hover texts
    if browser is None:
        pytest.skip("no Chromium here (CI installs it and sets EMBFAST_REQUIRE_BROWSER=1)")
    page = _open(browser, tmp_path / "map.html", "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    assert page.stdout.count('class="point"') == 160, "every point drawn as an SVG marker"
    assert _console(page.stderr) == [], _console(page.stderr)
    shot = _open(browser, tmp_path / "map.html", f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,900")
    assert shot.returncode == 0 and (tmp_path / "shot.png").stat().st_size > 10_000
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"), dtype=np.int16)
    coloured = (np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 40).sum()
    assert coloured > 500, "the screenshot shows coloured markers, not a blank page"


def test_browser_check_catches_a_broken_page(tmp_path):
    """The console check can fail: a page with a script error is caught."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here")
    (tmp_path / "bad.html").write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    page = _open(browser, tmp_path / "bad.html", "--dump-dom")
    assert any("Uncaught Error: boom" in line for line in _console(page.stderr))
