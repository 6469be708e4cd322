"""The Embedder facade on a tiny model: shapes, order, options, bad input, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from tolerances import assert_same_ranking

import embfast
from embfast import Embedder, InputTooLongError

TEXTS = ["short", "a somewhat longer sentence about cats and dogs", "x", "",
         "the quick brown fox jumps over the lazy dog " * 3, "Привет мир", "🙂 emoji"]


def test_shapes_and_dtypes(tiny):
    one = tiny.encode("hello world")
    assert one.shape == (32,) and one.dtype == np.float32
    many = tiny.encode(TEXTS)
    assert many.shape == (len(TEXTS), 32)
    empty = tiny.encode([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    assert isinstance(tiny.encode(TEXTS[:2], convert_to_numpy=False), list)


def test_results_in_input_order_whatever_the_batching(tiny):
    """Length sorting must not reorder results: each row equals the text encoded alone."""
    batched = tiny.encode(TEXTS, batch_size=3)
    alone = np.stack([tiny.encode(t) for t in TEXTS])
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5)
    tiny_budget = tiny.encode(TEXTS, batch_size=32, max_batch_tokens=20)
    np.testing.assert_allclose(tiny_budget, alone, rtol=1e-4, atol=1e-5)


def test_normalize_follows_model_and_can_be_overridden(tiny):
    v = tiny.encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    raw = tiny.encode(TEXTS, normalize_embeddings=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), v, rtol=1e-4, atol=1e-6)


def test_truncate_dim_renormalizes_after_cut(tiny):
    raw = tiny.encode(TEXTS, normalize_embeddings=False)
    cut = tiny.encode(TEXTS, truncate_dim=8)
    assert cut.shape == (len(TEXTS), 8)
    expected = raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="truncate_dim"):
        tiny.encode("x", truncate_dim=33)


def test_truncation_is_flagged_or_refused(tiny):
    long_text = "word " * 500
    v, info = tiny.encode(["short", long_text], return_info=True)
    assert info.truncated.tolist() == [False, True]
    assert info.token_counts[1] == tiny.max_seq_length
    assert info.token_counts[0] == 3  # [CLS] short [SEP]
    with pytest.raises(InputTooLongError, match="input 1"):
        tiny.encode(["short", long_text], truncate=False)
    # exactly at the limit is not truncation
    fits = "word " * (tiny.max_seq_length - 2)
    _, info = tiny.encode([fits], return_info=True)
    assert info.token_counts[0] == tiny.max_seq_length and not info.truncated[0]


def test_tokenizer_json_padding_is_overridden(tiny):
    """tokenizer.json ships Fixed(128) padding: a short batch must not be padded to 128."""
    tok = tiny.tokenizer.tokenize(["a b"])
    feeds = tiny.tokenizer.pad(tok.ids, np.arange(1))
    assert feeds["input_ids"].shape == (1, 4)


@pytest.mark.parametrize(("bad", "exc", "match"), [
    (None, TypeError, "got None"),
    (42, TypeError, "got int"),
    (b"bytes", TypeError, "bytes"),
    (["ok", 3], TypeError, r"sentences\[1\] must be a str, got int"),
    (["ok", ["nested"]], TypeError, "nested lists"),
    (["ok", None], TypeError, r"sentences\[1\]"),
    (np.array([["a"]]), TypeError, "1-D"),
])
def test_bad_input(tiny, bad, exc, match):
    with pytest.raises(exc, match=match):
        tiny.encode(bad)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "batch_size"),
    ({"precision": "float16"}, "precision"),
    ({"output_value": "cls"}, "output_value"),
    ({"prompt_name": "query"}, "prompt_name"),
    ({"max_batch_tokens": 0}, "max_batch_tokens"),
])
def test_bad_options(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(["x"], **kwargs)


def test_constructor_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="device must be one of cpu, cuda, auto"):
        Embedder(tiny_dir, device="tpu")
    with pytest.raises(ValueError, match="precision must be one of fp32, int8, fp16, auto"):
        Embedder(tiny_dir, precision="bf16")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Embedder(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="neither an embfast export"):
        Embedder(tmp_path)
    with pytest.raises(ValueError, match="fp16"):
        Embedder(tiny_dir, device="cpu", precision="fp16")


def test_cuda_fails_clearly_without_gpu(tiny_dir):
    if embfast.session.cuda_available():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(embfast.DeviceError, match="onnxruntime-gpu"):
        Embedder(tiny_dir, device="cuda")
    m = Embedder(tiny_dir, device="auto")
    assert m.device == "cpu" and m.precision == "fp32"


def test_token_embeddings_output(tiny):
    toks = tiny.encode(["a b c", "hello"], output_value="token_embeddings")
    assert [t.shape for t in toks] == [(5, 32), (3, 32)]
    pooled = tiny.encode(["a b c"], normalize_embeddings=False)
    np.testing.assert_allclose(toks[0].mean(axis=0), pooled[0], rtol=1e-4, atol=1e-6)


def test_output_precisions_match_sentence_transformers(tiny):
    from sentence_transformers.util.quantization import quantize_embeddings as st_quantize

    emb = tiny.encode(TEXTS)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        ours = tiny.encode(TEXTS, precision=precision)
        theirs = st_quantize(emb, precision=precision, calibration_embeddings=emb)
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_many_threads_get_the_same_vectors(tiny):
    texts = [f"sentence number {i} " + "word " * (i % 17) for i in range(64)]
    expected = tiny.encode(texts)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(j):
        try:
            mine = texts[j::8]
            results[j] = tiny.encode(mine, batch_size=3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for j in range(8):
        np.testing.assert_allclose(results[j], expected[j::8], rtol=1e-4, atol=1e-5)


def test_search_shapes_and_clamping(tiny):
    corpus = tiny.encode(TEXTS)
    hits = tiny.search("a sentence about cats", corpus, top_k=3)
    assert len(hits) == 1 and len(hits[0]) == 3
    assert hits[0][0]["score"] >= hits[0][1]["score"] >= hits[0][2]["score"]
    everything = tiny.search(["x", "short"], TEXTS, top_k=100)
    assert [len(h) for h in everything] == [len(TEXTS)] * 2
    assert everything[1][0]["corpus_id"] == 0  # "short" finds itself
    with pytest.raises(ValueError, match="dim"):
        tiny.search("x", np.zeros((4, 16), dtype=np.float32))
    assert tiny.search("x", [], top_k=3) == [[]]


def test_semantic_search_matches_sentence_transformers():
    import torch
    from sentence_transformers.util import semantic_search as st_search

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((500, 48)).astype(np.float32)
    queries = rng.standard_normal((4, 48)).astype(np.float32)
    ours = embfast.semantic_search(queries, corpus, top_k=7)
    theirs = st_search(torch.from_numpy(queries), torch.from_numpy(corpus), top_k=7)
    for a, b in zip(ours, theirs, strict=True):  # torch and our kernel round differently: near-ties may swap
        assert_same_ranking([h["corpus_id"] for h in a], [h["score"] for h in a],
                            [h["corpus_id"] for h in b], [h["score"] for h in b])


def test_build_info():
    info = embfast.build_info()
    for key in ("native", "version", "onnxruntime", "providers", "isa", "openmp"):
        assert key in info
    assert "CPUExecutionProvider" in info["providers"]
