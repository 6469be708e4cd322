"""The CUDA path's graphs, checked on the CPU provider here; GPU-only checks skip without a GPU."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_token_cap_default_and_errors(tiny, monkeypatch):
    """max_batch_tokens="auto" is the CPU's 1,024-token cap here (none on CUDA); other strings are errors."""
    from embfast.batching import plan_batches
    from embfast.encoder import CPU_MAX_BATCH_TOKENS

    texts = [f"sentence {i} " + "word " * (40 + i % 13) for i in range(41)]  # ~50 tokens: the cap splits
    seen = []
    run = tiny.embed_token_ids
    monkeypatch.setattr(tiny, "embed_token_ids", lambda ids, rows, **kw: seen.append(len(rows)) or run(ids, rows, **kw))
    tiny.encode(texts)
    lengths = tiny.tokenizer.tokenize(texts).lengths
    assert sorted(seen) == sorted(len(b) for b in plan_batches(lengths, 32, CPU_MAX_BATCH_TOKENS))
    assert max(seen) < 32  # the count cap alone would allow 32 rows
    with pytest.raises(ValueError, match="max_batch_tokens"):
        tiny.encode(texts, max_batch_tokens="many")


@pytest.fixture(scope="module")
def gpu_model(request) -> Path:
    """The model the GPU-only tests run: ``EMBFAST_GPU_TEST_MODEL`` (a folder embfast exported, for a GPU
    machine without optimum) or the tiny model, exported here."""
    folder = os.environ.get("EMBFAST_GPU_TEST_MODEL")
    return Path(folder) if folder else ensure_exported(request.getfixturevalue("tiny_dir"))


@needs_gpu
def test_cuda_embedder_matches_cpu(gpu_model):
    from embfast import Embedder

    texts = ["hello world", "a longer sentence about cats and dogs " * 3, "x",
             "GPU inference with ONNX Runtime and IO binding"] * 5
    cpu = Embedder(gpu_model, device="cpu", precision="fp32").encode(texts, batch_size=4)
    for precision in ("fp16", "fp32"):
        gpu = Embedder(gpu_model, device="cuda", precision=precision)
        assert gpu.device == "cuda" and gpu._pooled_runner is not None
        cos = (gpu.encode(texts, batch_size=4) * cpu).sum(1)
        assert cos.min() >= 0.999
    auto = Embedder(gpu_model, device="auto")  # precision defaults to "auto": fp16 on CUDA
    assert (auto.device, auto.precision) == ("cuda", "fp16")


@needs_gpu
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken", "mean_sqrt_len"])
def test_pooling_graph_on_cuda_matches_the_reference(gpu_model, pooling):
    from embfast import Embedder

    cpu = Embedder(gpu_model, device="cpu", precision="fp32")
    tok = cpu.tokenizer.tokenize(["hello world", "a longer sentence about cats and dogs", "x", ""])
    feeds = cpu.tokenizer.pad(tok.ids, np.arange(4))
    feeds["attention_mask"][2, :] = 0  # an all-padding row
    tokens = cpu.session.run(feeds)
    expected = reference.l2_normalize(reference.pool(tokens, feeds["attention_mask"], pooling))
    from embfast.variants import ensure_variant

    model = onnx.load(str(ensure_variant(gpu_model, "fp32")))
    pooled = append_pooling(model, cpu.session.output_name, pooling, True)
    from embfast.session import load_cuda_libraries

    load_cuda_libraries()
    sess = ort.InferenceSession(pooled.SerializeToString(), providers=["CUDAExecutionProvider"])
    runner = BoundRunner(sess, "sentence_embedding")
    assert runner.device == "cuda"
    got = runner.run({n: feeds[n] for n in cpu.session.input_names})
    real = [0, 1, 3]  # row 2 is all padding: its token vectors differ between CPU and CUDA attention kernels
    np.testing.assert_allclose(got[real], expected[real], atol=1e-3)  # CUDA matmuls may use TF32
    assert (got[real] * expected[real]).sum(1).min() >= 0.9999
    if pooling != "cls":  # an all-padding row gives zeros (cls keeps token 0, as the reference does)
        assert not got[2].any()
