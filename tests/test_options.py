"""Encode options with sentence-transformers' names, checked against sentence-transformers on the same folder:
prompts (and ``include_prompt: false`` pooling), encode_query / encode_document, truncate_dim, output precision,
token embeddings, progress bar, truncation report."""

from __future__ import annotations

import numpy as np
import pytest
from models_fixtures import build_prompt_bert, build_xlmr

from embfast import Embedder, InputTooLongError
from embfast.dense import activate

TEXTS = ["The cat sat on the mat.", "hi", "", "日本語のテキストです。", "Привет, как дела? " * 5, "word " * 300,
         "def f(x): return x ** 2", "🙂🚀", "How do I reset my password?", "a b c d e f g"]


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


@pytest.fixture(scope="module", params=["mean", "cls", "lasttoken"])
def prompt_pair(request, tmp_path_factory):
    """A BERT whose Pooling says include_prompt=false, + Dense(tanh) + default prompt; ours and ST's."""
    from sentence_transformers import SentenceTransformer

    d = build_prompt_bert(tmp_path_factory.mktemp("prompt") / f"pb-{request.param}", pooling=request.param)
    return Embedder(d, threads=1), SentenceTransformer(str(d), device="cpu")


@pytest.fixture(scope="module")
def xlmr_pair(tmp_path_factory):
    """XLM-R with E5-style "query: " / "passage: " prompts, include_prompt=true."""
    from sentence_transformers import SentenceTransformer

    d = build_xlmr(tmp_path_factory.mktemp("xlmr") / "xlmr")
    return Embedder(d, threads=1), SentenceTransformer(str(d), device="cpu")


@pytest.mark.parametrize("kwargs", [{}, {"prompt_name": "query"}, {"prompt_name": "document"}, {"prompt": ""},
                                    {"prompt": "Represent this sentence: "},
                                    {"prompt": "custom: ", "prompt_name": "query"}])
def test_prompts_match_sentence_transformers(prompt_pair, kwargs):
    ours, st = prompt_pair
    a = ours.encode(TEXTS, batch_size=4, **kwargs)
    b = st.encode(TEXTS, batch_size=4, **kwargs)
    assert a.shape == b.shape == (len(TEXTS), 24)
    cos = _cos(a, b)
    assert cos.min() >= 0.9999, (kwargs, cos.min(), TEXTS[int(cos.argmin())])


def test_include_prompt_false_leaves_prompt_tokens_out(prompt_pair):
    """Really left out: pooling the prompt tokens too gives other vectors (sentence-transformers agrees)."""
    ours, st = prompt_pair
    prompt = "Represent the question for retrieving documents: "
    assert ours.tokenizer.prompt_length(prompt) == len(st.tokenize([prompt])["input_ids"][0]) - 1
    a = ours.encode(TEXTS, prompt=prompt)
    st.set_pooling_include_prompt(True)
    try:
        with_prompt = st.encode(TEXTS, prompt=prompt)
    finally:
        st.set_pooling_include_prompt(False)
    if ours.config.pooling != "lasttoken":  # the last token is never a prompt token
        assert _cos(a, with_prompt).min() < 0.999


def test_default_prompt_and_query_document(prompt_pair, xlmr_pair):
    ours, st = prompt_pair
    assert ours.config.default_prompt_name == "short"
    np.testing.assert_allclose(ours.encode(TEXTS), ours.encode(TEXTS, prompt="q: "), atol=1e-6)
    for method in ("encode_query", "encode_document"):
        assert _cos(getattr(ours, method)(TEXTS), getattr(st, method)(TEXTS)).min() >= 0.9999, method
    xo, xst = xlmr_pair
    assert _cos(xo.encode_query(TEXTS), xst.encode_query(TEXTS)).min() >= 0.9999
    # E5-style prompts: no "document", so "passage" is the document prompt (sentence-transformers' documented
    # order document -> passage -> corpus; its 5.x adds an empty "document" prompt to every model, so its own
    # encode_document skips "passage: " there)
    assert _cos(xo.encode_document(TEXTS), xst.encode(TEXTS, prompt_name="passage")).min() >= 0.9999
    np.testing.assert_allclose(xo.encode_document(TEXTS), xo.encode(TEXTS, prompt="passage: "), atol=1e-6)
    np.testing.assert_allclose(xo.encode_query(TEXTS, prompt="x "), xo.encode(TEXTS, prompt="x "), atol=1e-6)
    with pytest.raises(ValueError, match=r"prompt_name 'nope' is not one of this model's prompts: \['passage'"):
        xo.encode("x", prompt_name="nope")


def test_halves_with_per_row_prompt_lengths(prompt_pair):
    """embed_token_ids + postprocess (the batcher's API) with one prompt length per row equals encode."""
    ours, _ = prompt_pair
    prompts = ["q: ", "Represent the document for retrieval: "]
    texts = [prompts[i % 2] + t for i, t in enumerate(TEXTS)]
    tok = ours.tokenizer.tokenize(texts)
    lengths = np.array([ours.tokenizer.prompt_length(prompts[i % 2]) for i in range(len(TEXTS))])
    pooled = ours.embed_token_ids(tok.ids, np.arange(len(texts))[::-1], prompt_length=lengths)[::-1]
    got = ours.postprocess(pooled)
    for i, t in enumerate(TEXTS):
        np.testing.assert_allclose(got[i], ours.encode(t, prompt=prompts[i % 2]), atol=1e-5)


def test_truncate_dim_per_model_and_per_call(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    d = build_prompt_bert(tmp_path_factory.mktemp("tdim") / "m")
    ours = Embedder(d, threads=1, truncate_dim=16)
    st = SentenceTransformer(str(d), device="cpu", truncate_dim=16)
    a, b = ours.encode(TEXTS), st.encode(TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 16) and ours.dim == 16
    assert _cos(a, b).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)  # normalized after the cut
    a, b = ours.encode(TEXTS, truncate_dim=8), st.encode(TEXTS, truncate_dim=8)
    assert a.shape == b.shape == (len(TEXTS), 8) and _cos(a, b).min() >= 0.9999
    with pytest.raises(ValueError, match=r"truncate_dim must be in \[1, 24\], got 25"):
        ours.encode("x", truncate_dim=25)  # the output dimension counts, after the Dense layer


FLOAT_NOISE = 1e-4  # fp32 parity: ONNX Runtime and torch agree to this per value (any x86-64 CPU, any threads)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_output_precision_matches_sentence_transformers(xlmr_pair, precision):
    """Quantized outputs equal sentence-transformers' except where float noise straddles a bucket edge.

    Both sides quantize their own float vectors, which agree to FLOAT_NOISE per value, not bit for
    bit (which CPU, which kernels). A value within that noise of a level boundary (int8 / uint8: calibration
    ranges from each side's own batch) or of zero (binary) may land one level, or one bit, apart; nothing
    else may differ. How many values sit that close depends on the machine, so no fraction is asserted.
    """
    ours, st = xlmr_pair
    a = ours.encode(TEXTS, precision=precision)
    b = st.encode(TEXTS, precision=precision)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.shape[1] == (32 if precision in ("int8", "uint8") else 4)
    fa, fb = ours.encode(TEXTS), st.encode(TEXTS)
    assert np.abs(fa - fb).max() <= FLOAT_NOISE
    if precision in ("int8", "uint8"):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 1
        # positions in units of one level: (x - min) / step, each side with its own ranges
        pos = [(f - f.min(0)) / ((f.max(0) - f.min(0)) / 255) for f in (fa, fb)]
        where = diff == 1
        # a differing level is a boundary case: the two positions straddle one integer (a bucket edge)
        # and agree to a small fraction of a level (float noise over a step of about range / 255)
        lo, hi = np.minimum(*pos)[where], np.maximum(*pos)[where]
        assert np.all(np.floor(hi) - np.floor(lo) == 1) and np.all(hi - lo <= 0.05), (lo, hi)
    else:
        bits = np.unpackbits(a.view(np.uint8), axis=1) != np.unpackbits(b.view(np.uint8), axis=1)
        # a differing bit is a sign flip of a value within float noise of zero
        assert np.all(np.abs(fb[bits[:, :32]]) <= FLOAT_NOISE), fb[bits[:, :32]]


def test_token_embeddings_match_sentence_transformers(xlmr_pair):
    ours, st = xlmr_pair
    a = ours.encode(TEXTS, output_value="token_embeddings", batch_size=4)
    b = st.encode(TEXTS, output_value="token_embeddings", batch_size=4)
    for x, y in zip(a, b, strict=True):
        y = y.numpy()
        assert x.shape == y.shape
        assert _cos(x, y).min() >= 0.9999


def test_progress_bar_and_convert_to_numpy(xlmr_pair, capsys):
    ours, _ = xlmr_pair
    plain = ours.encode(TEXTS, batch_size=2)
    with_bar = ours.encode(TEXTS, batch_size=2, show_progress_bar=True)
    np.testing.assert_array_equal(plain, with_bar)
    assert "encode" in capsys.readouterr().err
    as_list = ours.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == len(TEXTS) and as_list[0].shape == (32,)


def test_truncation_report_counts_prompt_tokens(prompt_pair):
    ours, st = prompt_pair
    prompt = "Represent the question for retrieving documents: "
    full = len(st.tokenizer(prompt + "word " * 10)["input_ids"]) - 10  # tokens besides the words
    texts = ["short", "word " * 60, "word " * (48 - full), "word " * (49 - full)]  # ..., exactly 48, one over
    _, info = ours.encode(texts, prompt=prompt, return_info=True)
    assert info.token_counts.tolist() == st.tokenize([prompt + t for t in texts])["attention_mask"].sum(1).tolist()
    assert info.truncated.tolist() == [False, True, False, True]
    assert info.token_counts.tolist()[1:] == [48, 48, 48] and ours.max_seq_length == 48
    with pytest.raises(InputTooLongError, match="input 1 has more than max_seq_length=48 tokens"):
        ours.encode(texts, prompt=prompt, truncate=False)
    ours.encode(texts[:1], prompt=prompt, truncate=False)  # fits: no error


@pytest.mark.parametrize("name", ["identity", "tanh", "relu", "sigmoid", "gelu", "silu"])
def test_dense_activations_match_torch(name):
    import torch

    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    fn = {"identity": torch.nn.Identity(), "tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU(),
          "sigmoid": torch.nn.Sigmoid(), "gelu": torch.nn.GELU(), "silu": torch.nn.SiLU()}[name]
    np.testing.assert_allclose(activate(x, name), fn(torch.from_numpy(x)).numpy(), atol=2e-6)
    with pytest.raises(ValueError, match="activation must be one of"):
        activate(x, "softmax")
