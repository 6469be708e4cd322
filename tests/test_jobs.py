"""``embfast encode`` as a user runs it: real files in every format, chunking, bad input, kill and resume."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embfast.benchcmd import sample_sentences
from embfast.chunking import Chunker
from embfast.io import BadInputError, ReadOptions, Record, read_records
from embfast.jobs import embedded_shards, encode_files, work_folder


def run_cli(*args, cwd, timeout=300):
    """The installed CLI in a subprocess, from ``cwd`` (never the source tree)."""
    return subprocess.run([sys.executable, "-m", "embfast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy(), cwd=cwd)


def start_cli(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "embfast.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy(), cwd=cwd)


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` real-looking texts built from the bundled real sentences: pairs, prefixes, cuts, case changes."""
    sents = sample_sentences()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(sents, 2)
        style = i % 5
        if style == 0:
            out.append(f"{a} {b}")
        elif style == 1:
            out.append(f"Note {i}: {a}")
        elif style == 2:
            out.append(a[: rng.randint(12, len(a))].rstrip() + f" ({i})")
        elif style == 3:
            out.append(f"{b.lower()} See also item {i}.")
        else:
            out.append(f"{a} {b} {rng.choice(sents)}")
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# ---- formats ---------------------------------------------------------------------------------------------------------
def test_encode_txt_to_npy_equals_encode(tiny, tiny_dir, tmp_path):
    texts = corpus(300)
    src = write_lines(tmp_path / "texts.txt", texts)
    r = run_cli("encode", src, "-o", "vectors.npy", "--model", tiny_dir, "--shard-size", 64, "--threads", 1,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 300 rows x 32 from 300 records" in r.stdout
    got = np.load(tmp_path / "vectors.npy")
    assert got.shape == (300, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, tiny.encode(texts), rtol=1e-4, atol=1e-5)
    assert not work_folder(tmp_path / "vectors.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.txt", "vectors.npy"]


def test_encode_jsonl_csv_parquet_inputs_and_outputs(tiny, tiny_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus(120, seed=1)
    docs = tmp_path / "docs"
    docs.mkdir()
    for part in range(2):  # two files, read through a glob in name order
        rows = [{"doc": f"d{i}", "body": texts[i], "extra": [1, 2]} for i in range(part * 60, part * 60 + 60)]
        write_lines(docs / f"part{part}.jsonl", [json.dumps(r) for r in rows])
    r = run_cli("encode", "docs/*.jsonl", "-o", "out.parquet", "--text-field", "body", "--id-field", "doc",
                "--include-text", "--model", tiny_dir, "--shard-size", 50, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "text", "vector"]
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(120)]
    assert table.column("text").to_pylist() == texts
    vec = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vec, tiny.encode(texts), rtol=1e-4, atol=1e-5)
    meta = json.loads(table.schema.metadata[b"embfast"])
    assert meta["model"] == "tiny-bert" and meta["dim"] == 32

    import csv

    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        w.writerows([[i, t] for i, t in enumerate(texts[:40])] + [[40, "multi-line\nvalue, with \"quotes\""]])
    r = run_cli("encode", "t.csv", "-o", "out.jsonl", "--id-field", "id", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [row["id"] for row in rows] == [str(i) for i in range(41)]
    np.testing.assert_allclose(np.asarray([row["vector"] for row in rows], np.float32),
                               tiny.encode(texts[:40] + ["multi-line\nvalue, with \"quotes\""]), rtol=1e-4, atol=1e-5)

    pq.write_table(pa.table({"text": texts[:30], "n": list(range(30))}), tmp_path / "t.parquet")
    r = run_cli("encode", "t.parquet", "-o", "p.jsonl", "--model", tiny_dir, "--dimensions", 16, "--no-normalize",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert [row["id"] for row in rows] == [f"t.parquet:{i}" for i in range(1, 31)]
    np.testing.assert_allclose(np.asarray([row["vector"] for row in rows], np.float32),
                               tiny.encode(texts[:30], truncate_dim=16, normalize_embeddings=False),
                               rtol=1e-4, atol=1e-5)


def test_encode_refuses_bad_options(tiny_dir, tmp_path):
    write_lines(tmp_path / "a.txt", ["hello"])
    r = run_cli("encode", "a.txt", "-o", "v.bin", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "output must end in .npy, .parquet or .jsonl, got 'v.bin'" in r.stderr
    r = run_cli("encode", "a.txt", "-o", "v.npy", "--include-text", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "needs a .parquet or .jsonl output" in r.stderr
    r = run_cli("encode", "nothing-*.txt", "-o", "v.npy", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "matches no file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ---- chunking --------------------------------------------------------------------------------------------------------
def test_chunking_writes_one_row_per_chunk_with_spans(tiny, tiny_dir, tmp_path):
    sents = sample_sentences()
    docs = [" ".join(sents[i:i + 9]) for i in range(0, 36, 9)] + ["Short one."]
    write_lines(tmp_path / "docs.jsonl", [json.dumps({"id": f"doc{i}", "text": d}) for i, d in enumerate(docs)])
    r = run_cli("encode", "docs.jsonl", "-o", "chunks.jsonl", "--id-field", "id", "--chunk-tokens", 24,
                "--chunk-overlap", 6, "--include-text", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "chunks.jsonl")
    tok = Chunker(tiny, 24, 6).tokenizer
    for i, doc in enumerate(docs):
        mine = [row for row in rows if row["doc_id"] == f"doc{i}"]
        assert [row["chunk_index"] for row in mine] == list(range(len(mine)))
        assert [row["id"] for row in mine] == [f"doc{i}#{k}" for k in range(len(mine))]
        assert mine[0]["char_start"] == 0 and mine[-1]["char_end"] == len(doc.rstrip())
        for a, b in itertools.pairwise(mine):
            assert b["char_start"] > a["char_start"] and b["char_start"] < a["char_end"]  # they overlap
        for row in mine:
            assert row["text"] == doc[row["char_start"]:row["char_end"]]
            assert len(tok.encode(row["text"], add_special_tokens=False).ids) <= 24
        assert (len(mine) > 1) == (i < 4)
    np.testing.assert_allclose(np.asarray([row["vector"] for row in rows], np.float32),
                               tiny.encode([row["text"] for row in rows]), rtol=1e-4, atol=1e-5)


def test_chunker_edges_and_errors(tiny):
    ch = Chunker(tiny, 5, 0)
    text = "one two three four five six seven eight nine ten eleven"
    spans = ch.split(text)
    assert [text[s:e] for s, e in spans] == ["one two three four five", "six seven eight nine ten", "eleven"]
    assert Chunker(tiny, 5, 2).split(text)[1] == (text.index("four"), text.index("eight") + 5)
    long_word = "supercalifragilisticexpialidocious " * 2
    assert all(e > s for s, e in Chunker(tiny, 2, 1).split(long_word))  # a word longer than the window is cut
    assert ch.split("\u200b") == [(0, 1)]  # no tokens: one chunk, the whole text
    with pytest.raises(ValueError, match=r"chunk_tokens must be an int in \[1, 62\] \(max_seq_length 64 minus 2"):
        Chunker(tiny, 63, 0)
    with pytest.raises(ValueError, match=r"chunk_overlap must be an int in \[0, 4\]"):
        Chunker(tiny, 5, 5)


# ---- streaming ------------------------------------------------------------------------------------------------------
def test_shards_stream_from_an_endless_reader(tiny):
    """Shards come out before the input ends: nothing holds the whole input."""
    endless = (Record(f"gen:{i}", str(i), f"text number {i}") for i in itertools.count())
    shards = embedded_shards(endless, tiny, shard_size=7)
    first, second = next(shards), next(shards)
    assert [r["id"] for r in first.rows] == [str(i) for i in range(7)]
    assert [r["id"] for r in second.rows] == [str(i) for i in range(7, 14)]
    assert first.vectors.shape == (7, 32)


def test_progress_lines_off_a_terminal_and_quiet(tiny_dir, tmp_path):
    write_lines(tmp_path / "a.txt", corpus(200))
    r = run_cli("encode", "a.txt", "-o", "v.npy", "--model", tiny_dir, "--shard-size", 20, "--progress-interval", 0,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("encode: ")]
    assert lines and all("texts/s" in ln and "tokens/s" in ln and "ETA" in ln for ln in lines)
    assert "/200 records" in lines[-1]
    r = run_cli("encode", "a.txt", "-o", "v.npy", "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""


# ---- interrupted and resumed -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, tiny_dir):
    """A 12,000-line file and its uninterrupted encode (CLI, same settings as the resumed runs)."""
    folder = tmp_path_factory.mktemp("resume")
    write_lines(folder / "big.txt", corpus(12000, seed=3))
    r = run_cli("encode", "big.txt", "-o", "full.jsonl", "--model", tiny_dir, "--shard-size", 300, "--threads", 1,
                "--quiet", cwd=folder)
    assert r.returncode == 0, r.stderr
    return folder, read_jsonl(folder / "full.jsonl")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_without_duplicates_or_gaps(big_corpus, tiny_dir, sig):
    folder, full = big_corpus
    out = folder / f"resumed-{sig.name}.jsonl"
    args = ("encode", "big.txt", "-o", out.name, "--model", tiny_dir, "--shard-size", 300, "--threads", 1, "--quiet")
    proc = start_cli(*args, cwd=folder)
    state = work_folder(out) / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["shards"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    done = json.loads(state.read_text())["shards"]
    assert 1 <= len(done) < 40, "the run must be stopped mid-way (after its first shard, before its last)"
    assert not out.exists()  # the output appears only complete
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "--resume" in err
    r = run_cli(*args, cwd=folder)
    assert r.returncode == 2 and "pass --resume to finish it" in r.stderr
    r = run_cli(*args, "--resume", cwd=folder)
    assert r.returncode == 0, r.stderr
    assert f"resumed after {len(done)} shards" in r.stdout
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == [row["id"] for row in full] == [f"big.txt:{i}" for i in range(1, 12001)]
    np.testing.assert_array_equal(np.asarray([row["vector"] for row in rows], np.float32),
                                  np.asarray([row["vector"] for row in full], np.float32))
    assert not work_folder(out).exists()


def test_resume_after_bad_input_and_refusals(tiny, tiny_dir, tmp_path):
    """A job stopped by a bad row keeps its shards; --resume checks settings and inputs, then finishes."""
    texts = corpus(100, seed=4)
    write_lines(tmp_path / "a.txt", texts[:60] + [""] + texts[60:])  # line 61 is empty
    args = ("encode", "a.txt", "-o", "v.npy", "--model", tiny_dir, "--shard-size", 25, "--quiet")
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "a.txt:61: empty line; pass --skip-bad" in r.stderr
    state = json.loads((tmp_path / "v.npy.parts" / "state.json").read_text())
    assert [s["records"] for s in state["shards"]] == [25, 25]
    r = run_cli(*args, "--resume", "--dimensions", 8, cwd=tmp_path)
    assert r.returncode == 2 and "settings differ" in r.stderr and "dimensions: None -> 8" in r.stderr
    r = run_cli(*args, "--resume", "--skip-bad", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 bad rows and 0 unreadable files" in r.stdout and "resumed after 2 shards" in r.stdout
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), tiny.encode(texts), rtol=1e-4, atol=1e-5)

    r = run_cli(*args, cwd=tmp_path)  # a fresh failing run again, then the input changes
    assert r.returncode == 2
    write_lines(tmp_path / "a.txt", texts)
    r = run_cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "the inputs changed" in r.stderr


# ---- bad input ----------------------------------------------------------------------------------------------------
BAD_CASES = [
    ("empty.txt", b"first line\n\nthird line\n", "empty.txt:2: empty line"),
    ("utf8.txt", b"fine\nbad \xff\xfe bytes\n", "utf8.txt:2: invalid UTF-8 (byte 0xff at column 5)"),
    ("field.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "field.jsonl:2: missing field 'text' (fields: body)"),
    ("missing.txt", None, "missing.txt: cannot read file: No such file or directory"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_and_line(tiny_dir, tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    (tmp_path / "v.npy").write_bytes(b"previous output")
    r = run_cli("encode", name, "-o", "v.npy", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2
    assert f"embfast encode: error: {message}; pass --skip-bad to skip and count bad rows" in r.stderr
    assert (tmp_path / "v.npy").read_bytes() == b"previous output"  # the old output is untouched
    assert not work_folder(tmp_path / "v.npy").exists()


def test_skip_bad_counts_every_bad_row_and_file(tiny, tiny_dir, tmp_path):
    for name, content, _ in BAD_CASES:
        if content is not None:
            (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.txt").mkdir()
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\nnot json\n[1]\n{"text": 5}\n{"text": " "}\n\xff\n'
                                         b'{"text": "fine", "id": 3}\n')
    r = run_cli("encode", "empty.txt", "utf8.txt", "field.jsonl", "missing.txt", "folder.txt", "-o", "v.jsonl",
                "--skip-bad", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 3 bad rows and 2 unreadable files" in r.stdout
    assert "skipped missing.txt: cannot read file" in r.stderr and "skipped folder.txt: cannot read file" in r.stderr
    rows = read_jsonl(tmp_path / "v.jsonl")
    assert [row["id"] for row in rows] == ["empty.txt:1", "empty.txt:3", "utf8.txt:1", "field.jsonl:1"]
    r = run_cli("encode", "bad.jsonl", "-o", "b.npy", "--skip-bad", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 0 and "skipped 5 bad rows" in r.stdout and "bad.jsonl:2: invalid JSON" in r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), tiny.encode(["ok", "fine"]), rtol=1e-4, atol=1e-5)


def _read_all(path: Path, **kw) -> tuple[list[Record], list[str]]:
    bad: list[str] = []
    recs = list(read_records([str(path)], ReadOptions(**kw), on_bad=lambda e: bad.append(str(e))))
    return recs, bad


def test_readers_report_every_kind_of_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok", "id": 1}\n{"text": null}\n{"text": ["x"]}\n{"text": "y"}\n\xef\xbb\n')
    recs, bad = _read_all(p, id_field="id")
    assert [r.text for r in recs] == ["ok"]
    assert bad == [f"{p}:2: field 'text' is null", f"{p}:3: field 'text' must be a string, got list",
                   f"{p}:4: missing field 'id' (the --id-field)",
                   f"{p}:5: invalid UTF-8 (byte 0xef at column 1)"]

    p = tmp_path / "a.csv"
    p.write_bytes(b"id,text\n1,hello\n2\n3,\"two\nlines\"\n4,bad \xff\n5,   \n")
    recs, bad = _read_all(p, id_field="id")
    assert [(r.id, r.text, r.source) for r in recs] == [("1", "hello", f"{p}:2"), ("3", "two\nlines", f"{p}:4")]
    assert bad == [f"{p}:3: missing field 'text' (fields: id, text)", f"{p}:6: invalid UTF-8 in column 2 (text)",
                   f"{p}:7: field 'text' is empty"]
    (tmp_path / "h.csv").write_text("id,body\n1,x\n")
    with pytest.raises(BadInputError, match=r"h.csv:1: missing field 'text' in the CSV header \(columns: id, body\)"):
        list(read_records([str(tmp_path / "h.csv")]))

    pq.write_table(pa.table({"text": ["a", None, ""]}), tmp_path / "a.parquet")
    recs, bad = _read_all(tmp_path / "a.parquet")
    assert [r.source for r in recs] == [f"{tmp_path / 'a.parquet'}:1"]
    assert bad == [f"{tmp_path / 'a.parquet'}:2: field 'text' is null", f"{tmp_path / 'a.parquet'}:3: field 'text' "
                   "is empty"]
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "b.parquet")
    with pytest.raises(BadInputError, match=r"b.parquet: missing field 'text' \(columns: body\)"):
        list(read_records([str(tmp_path / "b.parquet")]))
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadInputError, match="c.parquet: not a readable parquet file"):
        list(read_records([str(tmp_path / "c.parquet")]))
    with pytest.raises(ValueError, match=r"input must end in .txt, .jsonl, .csv or .parquet"):
        list(read_records([str(tmp_path / "x.doc")]))


def test_encode_files_python_api_and_job_lock(tiny, tmp_path):
    from embfast.jobs import _lock_job

    write_lines(tmp_path / "a.txt", ["alpha beta", "gamma"])
    res = encode_files([str(tmp_path / "a.txt")], tmp_path / "o.parquet", tiny, include_text=True)
    assert (res.rows, res.records, res.dim, res.bad_rows) == (2, 2, 32, 0)
    with pytest.raises(ValueError, match="shard_size must be an int >= 1, got 0"):
        encode_files([str(tmp_path / "a.txt")], tmp_path / "p.npy", tiny, shard_size=0)
    busy = work_folder(tmp_path / "b.npy")
    busy.mkdir()
    held = _lock_job(busy, tmp_path / "b.npy")  # as if another process were running this job
    try:
        with pytest.raises(RuntimeError, match=r"another embfast encode is writing .*b.npy right now"):
            encode_files([str(tmp_path / "a.txt")], tmp_path / "b.npy", tiny, resume=True)
    finally:
        held.close()
    assert not (tmp_path / "p.npy").exists() and not work_folder(tmp_path / "p.npy").exists()


# ---- bench and viz -------------------------------------------------------------------------------------------------
def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_writes_report_and_plots(tiny_dir, tmp_path):
    r = run_cli("bench", "--model", tiny_dir, "--precisions", "fp32", "--batch-sizes", "1,4", "--seq-lengths", "8,32",
                "--texts", 8, "--repeat", 1, "--latency-runs", 5, "--no-st", "--threads", 1, "-o", "rep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = tmp_path / "rep"
    report = (rep / "report.md").read_text()
    assert "| embfast | fp32 | cpu | 8 | 1 |" in report and "| embfast | fp32 | cpu | 32 | 4 |" in report
    assert "## Single-text latency" in report and "tiny-bert" in report
    results = [json.loads(line) for line in (rep / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in results] == ["throughput"] * 4 + ["latency"]
    assert all(r["texts_per_s"] > 0 for r in results[:4]) and results[4]["runs"] == 5
    assert _is_png(rep / "throughput.png") and _is_png(rep / "latency.png")
    r = run_cli("bench", "--model", tiny_dir, "--batch-sizes", "0", "-o", "rep", cwd=tmp_path)
    assert r.returncode == 2 and "expected comma-separated integers >= 1, got '0'" in r.stderr


@pytest.mark.slow
def test_bench_side_by_side_with_sentence_transformers(tiny_dir, tmp_path):
    r = run_cli("bench", "--model", tiny_dir, "--precisions", "fp32", "--batch-sizes", "2", "--seq-lengths", "16",
                "--texts", 4, "--repeat", 1, "--latency-runs", 3, "--threads", 1, "-o", "rep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| sentence-transformers | fp32 | cpu | 16 | 2 |" in (tmp_path / "rep" / "report.md").read_text()


def test_texts_of_length_are_exact(tiny):
    from embfast.benchcmd import texts_of_length

    for length in (3, 16, 64):
        texts = texts_of_length(tiny, length, 5)
        assert (tiny.count_tokens(texts) == length).all()
        assert len(set(texts)) == 5 or length < 16  # rotated sentences differ once they are long enough


def test_viz_plots_with_labels(tiny_dir, tmp_path):
    texts = corpus(60)
    write_lines(tmp_path / "a.txt", texts)
    r = run_cli("encode", "a.txt", "-o", "v.npy", "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    write_lines(tmp_path / "labels.txt", [f"kind{i % 3}" for i in range(60)])
    r = run_cli("viz", "v.npy", "--labels", "labels.txt", "-o", "plot.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote plot.png: 60 points (pca, 3 colours): PC1 ") and _is_png(tmp_path / "plot.png")
    write_lines(tmp_path / "short.txt", ["a", "b"])
    r = run_cli("viz", "v.npy", "--labels", "short.txt", "-o", "p2.png", cwd=tmp_path)
    assert r.returncode == 2 and "labels must have one entry per embedding row (60), got 2" in r.stderr
    assert not (tmp_path / "p2.png").exists()


def test_pca_2d_known_answers():
    from embfast.viz import pca_2d

    line = np.outer(np.arange(10.0), [3.0, 4.0])  # points on a line: one component explains everything
    pts, frac = pca_2d(line)
    np.testing.assert_allclose(frac, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(pts[:, 0]), np.abs(np.arange(10.0) - 4.5) * 5.0)
    pts, frac = pca_2d(np.ones((4, 3)))
    assert (pts == 0).all() and (frac == 0).all()
    with pytest.raises(ValueError, match=r"embeddings must be 2-D with at least one row, got shape \(0, 3\)"):
        pca_2d(np.zeros((0, 3)))


def test_prompts_follow_encode_and_the_index_uses_query_and_document_prompts(tmp_path_factory, tmp_path):
    """A model with named and default prompts: the job embeds exactly as Embedder.encode; the index as
    encode_document (adds) and encode_query (searches)."""
    from models_fixtures import build_prompt_bert

    from embfast import Embedder, Index

    model_dir = build_prompt_bert(tmp_path_factory.mktemp("prompt") / "prompt-bert")
    m = Embedder(model_dir, threads=1)
    texts = corpus(40, seed=5)
    write_lines(tmp_path / "a.txt", texts)
    for extra, want in (((), m.encode(texts)), (("--prompt-name", "query"), m.encode(texts, prompt_name="query")),
                        (("--prompt", "x: "), m.encode(texts, prompt="x: "))):
        r = run_cli("encode", "a.txt", "-o", "v.npy", "--model", model_dir, "--quiet", *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(np.load(tmp_path / "v.npy"), want, rtol=1e-4, atol=1e-5)
    index = Index(m)
    index.add(texts)
    q = "Investors worry about interest rates"
    by_vectors = Index(precision="fp32")
    by_vectors.add(m.encode_document(texts))
    want = by_vectors.search(m.encode_query(q), top_k=5)
    got = index.search(q, top_k=5)
    assert [h["id"] for h in got[0]] == [h["id"] for h in want[0]]
    np.testing.assert_allclose([h["score"] for h in got[0]], [h["score"] for h in want[0]], rtol=1e-5)
