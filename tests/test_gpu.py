"""The CUDA path's graphs, checked on the CPU provider here; GPU-only checks skip without a GPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from embfast import DeviceError, kernels
from embfast.export import ensure_exported
from embfast.gpu import BoundRunner, DeviceTopK, append_pooling
from embfast.kernels import reference
from embfast.session import cuda_available

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs onnxruntime-gpu and a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_export(tiny_dir):
    out = ensure_exported(tiny_dir)
    return out, onnx.load(str(out / "model.onnx"))


def _feeds(tiny):
    tok = tiny.tokenizer.tokenize(["hello world", "a longer sentence about cats and dogs", "x", ""])
    feeds = tiny.tokenizer.pad(tok.ids, np.arange(4))
    feeds["attention_mask"][2, :] = 0  # an all-padding row
    return feeds


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken", "mean_sqrt_len"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pooling_appended_to_the_graph_matches_the_reference(tiny, tiny_export, pooling, normalize):
    folder, model = tiny_export
    feeds = _feeds(tiny)
    tokens = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["last_hidden_state"], feeds)[0]
    expected = reference.pool(tokens, feeds["attention_mask"], pooling)
    if normalize:
        expected = reference.l2_normalize(expected)
    pooled = append_pooling(model, "last_hidden_state", pooling, normalize)
    sess = ort.InferenceSession(pooled.SerializeToString(), providers=["CPUExecutionProvider"])
    got = BoundRunner(sess, "sentence_embedding").run(feeds)
    assert got.shape == (4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_append_pooling_errors(tiny_export):
    _, model = tiny_export
    with pytest.raises(ValueError, match="pooling must be one of"):
        append_pooling(model, "last_hidden_state", "weighted", False)
    with pytest.raises(ValueError, match="not an output"):
        append_pooling(model, "nope", "mean", False)


@pytest.mark.parametrize("fp16", [False, True])
def test_device_topk_graph_matches_the_cpu_kernel(fp16):
    rng = np.random.default_rng(0)
    corpus = reference.l2_normalize(rng.standard_normal((2000, 48)).astype(np.float32))
    queries = reference.l2_normalize(rng.standard_normal((9, 48)).astype(np.float32))
    topk = DeviceTopK(corpus, device="cpu", fp16=fp16)
    s, i = topk.search(queries, 10)
    rs, ri = kernels.topk_cosine(queries, corpus, 10, assume_normalized=True)
    np.testing.assert_allclose(s, rs, atol=2e-3 if fp16 else 1e-5)
    assert (i == ri).mean() > (0.9 if fp16 else 0.99)
    s_all, _ = topk.search(queries[:1], 5000)  # k > n clamps
    assert s_all.shape == (1, 2000)
    assert topk.search(queries, 0)[0].shape == (9, 0)
    with pytest.raises(ValueError, match="dim"):
        topk.search(np.zeros((1, 3), np.float32), 1)


def test_cuda_only_pieces_fail_clearly_without_a_gpu():
    if cuda_available():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        DeviceTopK(np.ones((3, 4), np.float32), device="cuda")


@needs_gpu
def test_device_topk_on_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    corpus = reference.l2_normalize(rng.standard_normal((100_000, 384)).astype(np.float32))
    queries = corpus[:32]
    for fp16 in (False, True):
        s, i = DeviceTopK(corpus, device="cuda", fp16=fp16).search(queries, 10)
        rs, ri = kernels.topk_cosine(queries, corpus, 10, assume_normalized=True)
        np.testing.assert_allclose(s, rs, atol=2e-3 if fp16 else 1e-4)
        assert (i[:, 0] == ri[:, 0]).all()


def test_embedder_with_graph_pooling_matches_host_pooling(tiny_dir, tiny):
    """The CUDA path (pooling appended to the graph, IO binding) run on the CPU provider."""
    from embfast import Embedder

    graph = Embedder(tiny_dir, threads=1, graph_pooling=True)
    assert graph._pooled_runner is not None and tiny._pooled_runner is None
    texts = ["hello world", "a longer sentence about cats and dogs " * 3, "x", ""]
    np.testing.assert_allclose(graph.encode(texts, batch_size=3), tiny.encode(texts, batch_size=3),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(graph.encode(texts, truncate_dim=8), tiny.encode(texts, truncate_dim=8),
                               rtol=1e-5, atol=1e-6)


@needs_gpu
def test_cuda_embedder_matches_cpu(tiny_dir, tiny):
    from embfast import Embedder

    texts = ["hello world", "a longer sentence about cats and dogs " * 3, "x"]
    for precision in ("fp16", "fp32"):
        gpu = Embedder(tiny_dir, device="cuda", precision=precision)
        assert gpu.device == "cuda" and gpu._pooled_runner is not None
        cos = (gpu.encode(texts) * tiny.encode(texts)).sum(1)
        assert cos.min() >= 0.999
    assert Embedder(tiny_dir, device="auto").precision == "fp16"
