"""SparseEncoder (SPLADE) against sentence-transformers' SparseEncoder on the same folder: the real trained
splade-tiny (plain masked-LM folder and sentence-transformers' own SparseEncoder layout), tiny random masked
LMs (sum pooling, log1p_relu, XLM-R's 250k vocabulary); max_active_dims, decode, prompts, shapes, bad input,
kinds, int8's loss; and the exact sparse top-k against the scipy reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from models_fixtures import build_mlm_bert, build_mlm_xlmr, require_splade_tiny, st_sparse_layout
from tolerances import assert_same_ranking

from embfast import Embedder, SparseEncoder, sparse_search
from embfast.export import ModelKindError, read_manifest
from embfast.kernels import HAS_NUMBA
from embfast.kernels.sparse import InvertedIndex, reference_topk_sparse, topk_sparse
from embfast.sparse_encoder import to_csr
from embfast.text import InvalidTextError

TEXTS = ["The cat sat on the mat.", "", "what is the capital of France?",
         "Proteins fold into three-dimensional structures determined by their amino-acid sequence. " * 40,
         "東京は日本の首都です。", "Привет, как дела?", "🙂🚀 emoji", "  spaces   and\ttabs  ", "x",
         "def f(x): return x ** 2", "ÀÉÎÕÜ ñ ß ø å", "BRCA1 mutations increase breast-cancer risk (OR 5.2, p<0.001)."]
# Weights this close to zero may be zero on one engine and tiny on the other (float rounding of a logit at 0).
NOISE = 1e-5


def _dense(x) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return (x.to_dense() if x.is_sparse else x).cpu().numpy().astype(np.float64)
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def assert_same_sparse(ours, ref, *, atol: float = 1e-4, rtol: float = 0.0) -> None:
    """The same non-zero entries (up to weights below NOISE on both sides) and values within tolerance."""
    a, b = _dense(ours), _dense(ref)
    assert a.shape == b.shape
    differ = (a != 0) != (b != 0)
    assert not (differ & ((np.abs(a) > NOISE) | (np.abs(b) > NOISE))).any(), np.argwhere(differ)[:10]
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="session")
def splade_dir():
    return require_splade_tiny()


@pytest.fixture(scope="session")
def st_splade(splade_dir):
    from sentence_transformers import SparseEncoder as STSparseEncoder

    return STSparseEncoder(str(splade_dir), device="cpu")


@pytest.fixture(scope="session")
def splade(splade_dir):
    return SparseEncoder(splade_dir, threads=1)


@pytest.fixture(scope="session")
def sparse_dirs(tmp_path_factory, splade_dir):
    """sentence-transformers SparseEncoder folders (explicit SpladePooling), written by sentence-transformers."""
    root = tmp_path_factory.mktemp("sparse")
    bert = build_mlm_bert(root / "mlm-bert")
    xlmr = build_mlm_xlmr(root / "mlm-xlmr")
    return {"splade-tiny-st": st_sparse_layout(splade_dir, root / "splade-tiny-st"),
            "bert-sum-relu": st_sparse_layout(bert, root / "bert-sum", pooling="sum"),
            "bert-max-log1p": st_sparse_layout(bert, root / "bert-max-log1p", activation="log1p_relu"),
            "xlmr-sum-log1p": st_sparse_layout(xlmr, root / "xlmr-sum", pooling="sum", activation="log1p_relu")}


def test_splade_tiny_matches_sentence_transformers(splade, st_splade):
    ours, ref = splade.encode(TEXTS), st_splade.encode(TEXTS)
    assert isinstance(ours, sp.csr_array) and ours.dtype == np.float32 and ours.shape == (len(TEXTS), 30522)
    assert ours.has_sorted_indices
    a, b = _dense(ours), _dense(ref)
    assert ((a != 0) == (b != 0)).all()  # a trained model: no weight sits at float noise
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert splade.config.pooling == "max" and splade.config.activation == "relu"
    assert splade.max_seq_length == st_splade.max_seq_length


@pytest.mark.parametrize("name", ["splade-tiny-st", "bert-sum-relu", "bert-max-log1p", "xlmr-sum-log1p"])
def test_sentence_transformers_layout_matches(sparse_dirs, name):
    from sentence_transformers import SparseEncoder as STSparseEncoder

    folder = sparse_dirs[name]
    ours, st = SparseEncoder(folder, threads=1), STSparseEncoder(str(folder), device="cpu")
    pooling, _, activation = name.partition("-")[2].partition("-")
    if name != "splade-tiny-st":
        assert (ours.config.pooling, ours.config.activation) == (pooling, {"log1p": "log1p_relu"}.get(activation,
                                                                                                  activation))
    # XLM-R: torch holds (batch, seq_len, 250,002) logits: short texts keep that under 1 GB
    texts = [t[:200] for t in TEXTS] if "xlmr" in name else TEXTS
    a, b = ours.encode(texts), st.encode(texts)
    # sum pooling adds up to max_seq_length weights: relative float32 rounding of the sum
    assert_same_sparse(a, b, atol=1e-4, rtol=1e-5 if "sum" in name else 0.0)
    # max_active_dims keeps the same entries (ties need weights equal to float32 rounding: none here)
    ka, kb = ours.encode(texts, max_active_dims=7), st.encode(texts, max_active_dims=7)
    assert (np.diff(ka.indptr) <= 7).all()
    assert_same_sparse(ka, kb, atol=1e-4, rtol=1e-5 if "sum" in name else 0.0)


def test_max_active_dims_and_decode_match(splade, st_splade):
    for k in (1, 5, 64):
        ours, ref = splade.encode(TEXTS, max_active_dims=k), st_splade.encode(TEXTS, max_active_dims=k)
        assert_same_sparse(ours, ref)
    rows = splade.encode(TEXTS)
    ref = st_splade.encode(TEXTS)
    for i in range(len(TEXTS)):
        ours_dec, ref_dec = splade.decode(rows[[i]], top_k=10), st_splade.decode(ref[i], top_k=10)
        assert [t for t, _ in ours_dec] == [t for t, _ in ref_dec]
        np.testing.assert_allclose([w for _, w in ours_dec], [w for _, w in ref_dec], atol=1e-4)
    full = splade.decode(rows[[0]])
    assert len(full) == rows[[0]].nnz and all(full[j][1] >= full[j + 1][1] for j in range(len(full) - 1))
    assert len(splade.decode(rows)) == len(TEXTS)
    assert splade.decode(rows[[0]].toarray()[0], top_k=3) == splade.decode(rows[[0]], top_k=3)
    assert splade.encode(TEXTS, max_active_dims=3).nnz <= 3 * len(TEXTS)


def test_shapes_info_prompts(splade):
    one = splade.encode("hello world")
    assert one.shape == (1, splade.vocab_size) and one.nnz > 0
    assert (one != splade.encode(["hello world"])).nnz == 0
    empty = splade.encode([])
    assert empty.shape == (0, splade.vocab_size) and empty.dtype == np.float32
    rows, info = splade.encode(TEXTS, return_info=True, batch_size=3)
    assert info.truncated.tolist() == [i == 3 for i in range(len(TEXTS))]  # the long one is cut at 512 tokens
    assert info.token_counts[3] == splade.max_seq_length == 512
    assert (rows != splade.encode(TEXTS, batch_size=32, max_batch_tokens=None)).nnz == 0  # order kept
    prompted = splade.encode(["cats"], prompt="query: ")
    assert (prompted != splade.encode(["query: cats"])).nnz == 0
    assert (splade.encode_query(["cats"]) != splade.encode(["cats"])).nnz == 0  # no prompts in this model
    assert splade.count_tokens(["a b"]).tolist() == [4]


@pytest.mark.parametrize(("bad", "exc"), [(None, TypeError), (b"bytes", TypeError), ([1, "a"], TypeError),
                                          ([["nested"]], TypeError), ("caf\ud800e", InvalidTextError),
                                          (["ok", "x\udfffy"], InvalidTextError), (3.5, TypeError)])
def test_bad_input(splade, bad, exc):
    with pytest.raises(exc):
        splade.encode(bad)


def test_bad_options(splade, tmp_path):
    for kw in ({"max_active_dims": 0}, {"max_active_dims": 2.5}, {"batch_size": 0}, {"max_batch_tokens": "x"}):
        with pytest.raises(ValueError):
            splade.encode(["a"], **kw)
    with pytest.raises(ValueError, match="prompt_name"):
        splade.encode(["a"], prompt_name="nope")
    with pytest.raises(TypeError):
        splade.encode(["a"], prompt=3)
    with pytest.raises(ValueError):
        splade.decode(splade.encode(["a"]), top_k=0)
    with pytest.raises(ValueError, match="columns"):
        splade.decode(np.zeros(5))
    with pytest.raises(FileNotFoundError):
        SparseEncoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="precision"):
        SparseEncoder(splade.model_dir, precision="fp64")
    with pytest.raises(ValueError, match="max_seq_length"):
        SparseEncoder(splade.model_dir, max_seq_length=10_000)


def test_kinds_are_refused(splade, sparse_dirs, minilm_dir):
    with pytest.raises(ModelKindError, match="SparseEncoder"):
        Embedder(sparse_dirs["bert-sum-relu"])  # a SparseEncoder folder
    with pytest.raises(ModelKindError, match="Embedder"):
        SparseEncoder(minilm_dir)
    assert read_manifest(splade.model_dir)["kind"] == "sparse-encoder"
    assert splade.session.output_name == "sparse_embedding"  # pooled in the graph: (batch, vocab) out


def test_int8_loss_is_small(splade_dir, splade):
    """int8 (dynamic, per-channel weights): measured on splade-tiny, the vectors keep cosine >= 0.95 to fp32
    and the top-10 terms of each text mostly agree; the figures are stated in benchmarks/README.md."""
    q = SparseEncoder(splade_dir, precision="int8", threads=1)
    a, b = _dense(splade.encode(TEXTS)), _dense(q.encode(TEXTS))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.9, cos
    top = [len(set(np.argsort(-a[i])[:10]) & set(np.argsort(-b[i])[:10])) for i in range(len(TEXTS))]
    assert np.mean(top) >= 6, top


# ---- exact sparse top-k -----------------------------------------------------------------------------------
def _random_sparse(rng, n, width, nnz_per_row, *, negative=False, ties=False):
    rows = []
    for _ in range(n):
        cols = rng.choice(width, size=min(width, rng.integers(0, nnz_per_row + 1)), replace=False)
        vals = rng.integers(1, 4, cols.size).astype(np.float32) if ties else rng.random(cols.size, np.float32)
        if negative:
            vals -= 0.3
        r = np.zeros(width, np.float32)
        r[cols] = vals
        rows.append(r)
    return sp.csr_array(np.array(rows).reshape(n, width))


BACKENDS = ["reference"] + (["numba"] if HAS_NUMBA else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "width", "nnz", "k"), [(1, 3, 2, 1), (17, 8, 3, 5), (200, 50, 6, 10),
                                                      (64, 1000, 40, 64), (33, 16, 4, 100), (10, 5, 2, 0)])
@pytest.mark.parametrize("kind", ["plain", "ties", "negative"])
def test_topk_sparse_matches_reference(backend, n, width, nnz, k, kind):
    rng = np.random.default_rng(n * 7 + k)
    corpus = _random_sparse(rng, n, width, nnz, negative=kind == "negative", ties=kind == "ties")
    queries = _random_sparse(rng, 9, width, nnz, negative=kind == "negative", ties=kind == "ties")
    s, i = topk_sparse(queries, corpus, k, backend=backend, threads=2)
    rs, ri = reference_topk_sparse(queries, corpus, k)
    assert s.shape == i.shape == (9, min(k, n)) and s.dtype == np.float32 and i.dtype == np.int64
    dense = queries.toarray().astype(np.float64) @ corpus.toarray().astype(np.float64).T
    for r in range(9):
        assert_same_ranking(i[r], s[r], ri[r], rs[r], atol=1e-5)
        np.testing.assert_allclose(s[r], dense[r, i[r]], atol=1e-5)
    if kind == "ties":  # integer weights: exact ties, broken by the lower row
        np.testing.assert_array_equal(i, ri)


def test_sparse_search_shapes_and_errors():
    rng = np.random.default_rng(0)
    dense = _random_sparse(rng, 30, 20, 5).toarray()
    dense[3] = 0  # an all-zero row
    corpus = sp.csr_array(dense)
    index = InvertedIndex(corpus)
    hits = sparse_search(corpus[[0, 1]], index, top_k=4)
    assert len(hits) == 2 and all(len(h) == 4 for h in hits)
    assert hits == sparse_search(corpus[[0, 1]].toarray(), corpus, top_k=4)
    assert sparse_search(corpus[[0]], corpus, top_k=0) == [[]]
    assert len(sparse_search(corpus[[0]], corpus, top_k=100)[0]) == 30
    zero_q = sp.csr_array((1, 20), dtype=np.float32)
    assert [h["corpus_id"] for h in sparse_search(zero_q, corpus, top_k=3)[0]] == [0, 1, 2]
    with pytest.raises(ValueError, match="columns"):
        sparse_search(sp.csr_array((1, 21), dtype=np.float32), corpus)
    with pytest.raises(ValueError):
        sparse_search(corpus[[0]], corpus, top_k=-1)
    with pytest.raises(TypeError):
        sparse_search("text", corpus)
    bad = corpus[[0]].copy()
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sparse_search(bad, corpus)


def test_splade_retrieval_end_to_end(splade):
    docs = ["Paris is the capital of France.", "The mitochondria is the powerhouse of the cell.",
            "BRCA1 mutations raise breast cancer risk.", ""]
    hits = sparse_search(splade.encode(["capital of france", "brca1 cancer"]), splade.encode(docs), top_k=2)
    assert [h[0]["corpus_id"] for h in hits] == [0, 2]
    dense = to_csr(np.array([[0, 2.0, 0, 1.0]], np.float32), max_active_dims=1)
    assert dense.indices.tolist() == [1]
