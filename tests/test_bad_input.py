"""Bad and edge input everywhere text enters: lone surrogates (invalid Unicode), one definition of a line,
empty inputs under every option, the chunker's token bound, and quantized index scores on the cosine scale.

Each place where text enters embfast has a row here: Embedder.encode / search / count_tokens, prompts, the
DynamicBatcher (threads and asyncio), the HTTP routes, every CLI reader (txt, jsonl, csv, parquet), index
build / add, chunking, corpus-text files and viz labels.
"""

from __future__ import annotations

import asyncio
import json
import re
import string

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_jobs import run_cli
from test_server import serve

from embfast import DynamicBatcher, Index, kernels
from embfast.chunking import Chunker
from embfast.io import ReadOptions, read_records
from embfast.kernels import reference
from embfast.server import create_app, load_corpus_texts
from embfast.text import InvalidTextError, check_texts, lone_surrogate, read_lines, split_lines
from embfast.viz import read_labels

BAD = "caf\ud800e"  # what JSON "caf\ud800e" decodes to: half of a surrogate pair
BAD_JSON_LINE = '{"text": "caf\\ud800e"}'  # the same, as a careless producer writes it to a .jsonl file
SURROGATE_MSG = r"invalid Unicode \(lone surrogate U\+D800 at column 4\)"


# ---- embfast.text ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "pos"), [("", -1), ("ascii", -1), ("日本🙂", -1), ("\ud800", 0), (BAD, 3),
                                           ("ok\udfff", 2), ("🙂\udc80", 1), ("a\ud83d\ude42b", 1),
                                           (json.loads('"a\\ud83d\\ude42b"'), -1)])
def test_lone_surrogate_positions(text, pos):
    # in Python source "\ud83d\ude42" is two lone surrogates; JSON joins the same escapes into one emoji
    assert lone_surrogate(text) == pos


@pytest.mark.parametrize(("text", "lines"), [
    ("", []), ("\n", [""]), ("a", ["a"]), ("a\n", ["a"]), ("a\nb", ["a", "b"]), ("a\n\nb\n", ["a", "", "b"]),
    ("a\r\nb\r\n", ["a", "b"]), ("a\r\r\n", ["a\r"]), ("a\rb", ["a\rb"]),
    ("form\ffeed\vtab\x1c\x1d\x1e\x85 \u2028 \u2029end\n", ["form\ffeed\vtab\x1c\x1d\x1e\x85 \u2028 \u2029end"]),
])
def test_a_line_ends_at_newline_only(text, lines, tmp_path):
    assert split_lines(text) == lines
    path = tmp_path / "f.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a BOM is not part of the first line
    assert read_lines(path) == lines


# ---- the Python API -------------------------------------------------------------------------------------------
def test_encode_names_the_input_and_column(tiny):
    with pytest.raises(InvalidTextError, match=r"sentences\[1\] has " + SURROGATE_MSG) as err:
        tiny.encode(["ok", BAD])
    assert isinstance(err.value, ValueError) and (err.value.index, err.value.position) == (1, 3)
    with pytest.raises(ValueError, match=r"^sentences has invalid Unicode \(lone surrogate U\+DC80 at column 2\)"):
        tiny.encode("a\udc80")
    with pytest.raises(ValueError, match=r"prompt has " + SURROGATE_MSG):
        tiny.encode(["ok"], prompt=BAD)
    with pytest.raises(ValueError, match=r"sentences\[0\] has "):
        tiny.count_tokens([BAD])
    with pytest.raises(ValueError, match=r"sentences\[0\] has "):
        tiny.search([BAD], ["a corpus text"])
    with pytest.raises(ValueError, match=r"sentences\[1\] has "):
        tiny.search("query", ["a corpus text", BAD])
    assert tiny.encode(["ok", "caf\u00e9 🙂"]).shape == (2, tiny.dim)  # valid non-ASCII (a real pair) is fine


def test_batcher_refuses_invalid_unicode_and_keeps_serving(tiny):
    with DynamicBatcher(tiny) as b:
        with pytest.raises(ValueError, match=r"sentences\[1\] has " + SURROGATE_MSG):
            b.encode(["ok", BAD])

        async def both():
            bad = b.encode_async([BAD])
            good = b.encode_async(["ok"])
            return await asyncio.gather(bad, good, return_exceptions=True)

        bad, good = asyncio.run(both())
        assert isinstance(bad, InvalidTextError)
        np.testing.assert_allclose(good, tiny.encode(["ok"]), rtol=1e-4, atol=1e-5)


def test_index_refuses_invalid_unicode_in_texts_ids_metadata_and_queries(tiny):
    index = Index(tiny)
    vec = tiny.encode(["a", "b"])
    for kwargs, match in [({"items": ["ok", BAD]}, r"items\[1\] has "),
                          ({"items": vec, "texts": ["ok", BAD]}, r"texts\[1\] has "),
                          ({"items": vec, "ids": ["x", BAD]}, r"ids\[1\] has "),
                          ({"items": vec, "metadata": [None, {"k": BAD}]}, r"metadata\[1\] has "),
                          ({"items": vec, "metadata": [{BAD: 1}, None]}, r"metadata\[0\] has ")]:
        with pytest.raises(ValueError, match=match):
            index.add(**kwargs)
        assert len(index) == 0, "a refused add must leave the index as it was"
    index.add(["ok", "fine"])
    with pytest.raises(ValueError, match="^queries has "):
        index.search(BAD)


# ---- HTTP --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_url(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("srv")
    lines = ["plain", "form\ffeed", "line\u2028separator", "windows"]
    (folder / "texts.txt").write_bytes("plain\nform\ffeed\nline\u2028separator\r\nwindows\n".encode())
    np.save(folder / "v.npy", tiny.encode(lines))
    with serve(create_app(tiny, corpus=folder / "v.npy", corpus_texts=folder / "texts.txt")) as (url, _):
        yield url


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/embeddings", b'{"input": ["ok", "caf\\ud800e"]}', "input[1]"),
    ("/v1/embeddings", b'{"input": "caf\\ud800e"}', "input"),
    ("/v1/embeddings", b'{"input": ["\\udfff"], "encoding_format": "base64", "dimensions": 8}', "input[0]"),
    ("/v1/search", b'{"query": ["ok", "caf\\ud800e"]}', "query[1]"),
    ("/v1/search", b'{"query": "caf\\ud800e", "top_k": 2}', "query"),
])
def test_server_answers_422_naming_the_input(app_url, path, body, param):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "invalid_input"
        assert re.search(re.escape(param) + r" has invalid Unicode \(lone surrogate U\+D[89AF][0-9A-F]{2} at column",
                         err["message"]), err["message"]
        assert c.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_server_corpus_texts_follow_the_line_definition(app_url, tiny):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        r = c.post("/v1/search", json={"query": ["form\ffeed", "line\u2028separator"], "top_k": 1})
        assert r.status_code == 200, r.text
        hits = [row["hits"][0] for row in r.json()["data"]]
        assert [(h["id"], h["text"]) for h in hits] == [(1, "form\ffeed"), (2, "line\u2028separator")]
    with pytest.raises(ValueError, match=r"corpus_texts\[1\] has "):
        load_corpus_texts(["ok", BAD], 2)


def test_server_refuses_empty_input_under_every_option(app_url):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        for extra in ({}, {"encoding_format": "base64"}, {"dimensions": 8}, {"truncate": False}):
            r = c.post("/v1/embeddings", json={"input": [], **extra})
            assert r.status_code == 422 and "must not be an empty list" in r.json()["error"]["message"]
        r = c.post("/v1/search", json={"query": []})
        assert r.status_code == 422 and "must not be an empty list" in r.json()["error"]["message"]


# ---- files and the CLI ---------------------------------------------------------------------------------------
def _parquet_with_bad_bytes(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"first good", b"caf\xed\xa0\x80e", b"third good", b"x\xffy"], type=pa.binary())
    pq.write_table(pa.table({"text": raw.view(pa.string()), "id": ["a", "b", "c", "d"]}), path)
    return path


def test_readers_report_invalid_unicode_with_file_and_line(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "good"}\n' + BAD_JSON_LINE + '\n{"text": "ok", "id": "caf\\udfffe"}\n',
                  encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{jl}:2: ") + SURROGATE_MSG + " in field 'text'"):
        list(read_records([str(jl)]))
    bad: list = []
    assert list(read_records([str(jl)], ReadOptions(id_field="id"), on_bad=bad.append)) == []
    assert [(e.line, e.reason.split(" (")[0]) for e in bad] == [(1, "missing field 'id'"), (2, "invalid Unicode"),
                                                                (3, "invalid Unicode")]
    assert "in field 'id'" in bad[2].reason

    pq_path = _parquet_with_bad_bytes(tmp_path / "d.parquet")
    bad = []
    got = list(read_records([str(pq_path)], on_bad=bad.append))
    assert [r.text for r in got] == ["first good", "third good"]
    assert [(e.line, e.reason) for e in bad] == [(2, "invalid UTF-8 (byte 0xed at byte 4)"),
                                                 (4, "invalid UTF-8 (byte 0xff at byte 2)")]

    csv_path = tmp_path / "d.csv"  # UTF-8 files cannot hold a surrogate: its encoded bytes are invalid UTF-8
    csv_path.write_bytes(b"text\ngood\ncaf\xed\xa0\x80e\n")
    bad = []
    assert [r.text for r in read_records([str(csv_path)], on_bad=bad.append)] == ["good"]
    assert bad[0].line == 3 and "invalid UTF-8" in bad[0].reason


def test_cli_encode_and_index_stop_on_invalid_unicode_or_skip_it(tiny_dir, tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "good one"}\n' + BAD_JSON_LINE + '\n{"text": "good two"}\n',
                                         encoding="utf-8")
    r = run_cli("encode", "docs.jsonl", "-o", "out.npy", "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "docs.jsonl:2: invalid Unicode (lone surrogate U+D800 at column 4) in field 'text'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.npy").exists()
    r = run_cli("encode", "docs.jsonl", "-o", "out.jsonl", "--model", tiny_dir, "--skip-bad", "--include-text",
                "--chunk-tokens", 4, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 bad rows" in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text("utf-8").splitlines()]
    assert {row["doc_id"] for row in rows} == {"docs.jsonl:1", "docs.jsonl:3"}

    r = run_cli("index", "build", "docs.jsonl", "-o", "docs.embf", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "docs.jsonl:2: invalid Unicode" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("index", "build", "docs.jsonl", "-o", "docs.embf", "--model", tiny_dir, "--skip-bad", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _parquet_with_bad_bytes(tmp_path / "more.parquet")
    r = run_cli("index", "add", "docs.embf", "more.parquet", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "more.parquet:2: invalid UTF-8" in r.stderr
    r = run_cli("index", "add", "docs.embf", "more.parquet", "--model", tiny_dir, "--skip-bad", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(Index.load(tmp_path / "docs.embf")) == 4
    # a query whose bytes are not UTF-8 reaches Python as a lone surrogate (surrogateescape)
    r = run_cli("search", "docs.embf", "caf\udcffe", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 2 and "invalid Unicode (lone surrogate U+DCFF at column 4)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_every_line_reader_gives_row_i_for_line_i(tiny_dir, tiny, tmp_path):
    """A 4-line file whose lines hold a form feed, U+2028, U+0085 and a Windows line end: 4 rows everywhere."""
    lines = ["plain text", "form\ffeed and \vtab", "line\u2028separator \u2029 and \x85", "windows end"]
    (tmp_path / "texts.txt").write_bytes(("\n".join(lines[:3]) + "\n" + lines[3] + "\r\n").encode("utf-8"))
    r = run_cli("encode", "texts.txt", "-o", "v.npy", "--model", tiny_dir, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (4, tiny.dim)
    np.testing.assert_allclose(vectors, tiny.encode(lines), rtol=1e-4, atol=1e-5)
    assert load_corpus_texts(tmp_path / "texts.txt", 4) == lines
    assert read_labels(tmp_path / "texts.txt", 4) == lines
    r = run_cli("index", "build", "texts.txt", "-o", "t.embf", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    index = Index.load(tmp_path / "t.embf")
    assert [index.text_at(i) for i in range(len(index))] == lines
    r = run_cli("demo", "--corpus", "texts.txt", "--model", tiny_dir, cwd=tmp_path)
    assert r.returncode == 0 and "embedded 4 texts" in r.stdout, r.stderr
    (tmp_path / "labels.jsonl").write_text(BAD_JSON_LINE.replace("text", "label") + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels.jsonl:1: " + SURROGATE_MSG):
        read_labels(tmp_path / "labels.jsonl", 1, "label")


# ---- empty inputs under every option -------------------------------------------------------------------------
def _expected_empty(dim: int, precision: str, output_value: str, convert: bool):
    if output_value == "token_embeddings" or not convert:
        return None
    width = dim // 8 if precision in ("binary", "ubinary") else dim
    dtype = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
    return (0, width), dtype[precision]


def _check_empty(result, dim, precision, output_value, convert, return_info):
    if return_info:
        result, info = result
        assert info.token_counts.shape == (0,) and info.truncated.shape == (0,)
    want = _expected_empty(dim, precision, output_value, convert)
    if want is None:
        assert isinstance(result, list) and result == []
    else:
        assert isinstance(result, np.ndarray) and (result.shape, result.dtype) == want


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_empty_input_under_every_option(tiny, precision):
    seen = 0
    with DynamicBatcher(tiny) as b:
        for truncate_dim in (None, 16):
            dim = truncate_dim or tiny.dim
            for prompt in (None, "query: "):
                for return_info in (False, True):
                    for convert in (True, False):
                        kw = {"precision": precision, "truncate_dim": truncate_dim, "prompt": prompt,
                              "return_info": return_info, "convert_to_numpy": convert}
                        for output_value in ("sentence_embedding", "token_embeddings"):
                            _check_empty(tiny.encode([], output_value=output_value, **kw), dim, precision,
                                         output_value, convert, return_info)
                            seen += 1
                        _check_empty(b.encode([], **kw), dim, precision, "sentence_embedding", convert, return_info)
                        _check_empty(asyncio.run(b.encode_async([], **kw)), dim, precision, "sentence_embedding",
                                     convert, return_info)
    assert seen == 32  # 2 truncate_dim x 2 prompt x 2 return_info x 2 convert x 2 output_value


# ---- the chunker's bound ----------------------------------------------------------------------------------------
def _pieces(embedder, text: str) -> int:
    return len(embedder.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)


def test_chunk_of_an_unspaced_word_fits(minilm):
    word = "pneumonoultramicroscopicsilicovolcanoconiosis"  # 45 letters, no space: cut inside the word
    for tokens in range(1, 12):
        chunker = Chunker(minilm, tokens, 0)
        spans = chunker.split(word)
        assert "".join(word[s:e] for s, e in spans) == word
        assert max(_pieces(minilm, word[s:e]) for s, e in spans) <= tokens, (tokens, spans)


TEXTS = st.one_of(
    st.text(alphabet=string.ascii_letters, min_size=1, max_size=300),  # unspaced
    st.builds(lambda host, path: f"https://{host}.example.com/{path}?q={path[::-1]}&x=1#frag",
              st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=40),
              st.text(alphabet=string.ascii_letters + string.digits + "/_-.%", min_size=0, max_size=120)),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=200),  # CJK
    st.text(alphabet=st.sampled_from(list("🙂🚀👍🏽👨‍👩‍👧🇫🇷❤️✨")), min_size=1, max_size=80),  # emoji, ZWJ, flags
    st.text(alphabet=st.sampled_from(list("éèêëàâäôöûüçñÅåØøßœÆĳǅ ")), min_size=1, max_size=200),  # accented
    st.text(min_size=1, max_size=200),  # anything Python can hold, surrogates excepted below
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, tokens=st.integers(1, 16), overlap_frac=st.floats(0, 0.9))
def test_every_chunk_retokenizes_within_the_bound(minilm, text, tokens, overlap_frac):
    if lone_surrogate(text) >= 0:
        return  # refused before chunking (the readers report it)
    chunker = Chunker(minilm, tokens, min(int(tokens * overlap_frac), tokens - 1))
    spans = chunker.split(text)
    assert spans and all(0 <= s < e <= len(text) or (s, e) == (0, len(text)) for s, e in spans)
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)
    for s, e in spans:
        n = _pieces(minilm, text[s:e])
        assert n <= tokens or e - s == 1, (text[s:e], n, tokens)  # one character is never cut
    covered = np.zeros(len(text), dtype=bool)
    for s, e in spans:
        covered[s:e] = True
    enc = minilm.tokenizer.tokenizer.encode(text, add_special_tokens=False)
    for a, b in enc.offsets:  # every character that makes a token is in some chunk
        assert covered[a:b].all(), (text, a, b, spans)


# ---- quantized index scores on the cosine scale --------------------------------------------------------------
def _unit_rows(n, d, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, d)).astype(np.float32)
    return reference.l2_normalize(centers[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, d)))


def test_quantized_scores_without_rescoring_estimate_the_cosine():
    corpus, queries = _unit_rows(2000, 64, 0), _unit_rows(6, 64, 1)
    exact = queries @ corpus.T
    qc = kernels.quantize(corpus, "int8")
    deq = reference.dequantize_int8(qc.codes, qc.ranges)
    # |cos(q, d) - cos(q, c)| <= |d/|d| - c| <= 2 |d - c| for unit q and c: the bound per row, from the codes
    bound = 2 * np.linalg.norm(deq - corpus, axis=1) + 1e-5
    s, i = kernels.topk_quantized(queries, qc, 10)
    assert np.all(np.diff(s, axis=1) <= 0), "best first"
    for row in range(6):
        err = np.abs(s[row] - exact[row, i[row]])
        assert np.all(err <= bound[i[row]]), (err, bound[i[row]])
    qb = kernels.quantize(corpus, "binary")
    s, i = kernels.topk_quantized(queries, qb, 10)
    bits_q = np.unpackbits(reference.quantize_binary(queries), axis=1)[:, :64]
    bits_c = np.unpackbits(qb.codes, axis=1)[:, :64]
    for row in range(6):
        hamming = (bits_q[row] != bits_c[i[row]]).sum(axis=1)
        np.testing.assert_allclose(s[row], 1 - 2 * hamming / 64, atol=1e-6)
    assert s.min() >= -1 and s.max() <= 1


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_index_without_rescoring_returns_cosine_estimates(precision):
    corpus = _unit_rows(500, 64, 2)
    index = Index(precision=precision)
    index.add(corpus)
    raw = index.search(corpus[:3], top_k=5, rescore=False)
    fine = index.search(corpus[:3], top_k=5)
    for row, (a, b) in enumerate(zip(raw, fine, strict=True)):
        assert a[0]["id"] == row and b[0]["id"] == row
        assert all(-1 <= h["score"] <= 1 for h in a)
        if precision == "binary":
            assert a[0]["score"] == 1.0  # a row against itself: Hamming distance 0
        else:
            assert a[0]["score"] == pytest.approx(1.0, abs=0.01)
        assert max(abs(h["score"] - float(corpus[row] @ corpus[h["id"]])) for h in a) <= 0.5


def test_check_texts_accepts_valid_text():
    check_texts(["", "plain", "日本語", "🙂", "a\u2028b"])
    with pytest.raises(InvalidTextError, match=r"names\[2\] has "):
        check_texts(["a", "b", "\ud800"], "names")
