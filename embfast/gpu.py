"""The CUDA path, built from ONNX graphs so it runs (and is tested) on any ONNX Runtime provider.

- :func:`append_pooling` appends pooling (mean / cls / max / lasttoken / mean_sqrt_len) and optional
  L2 normalization to an exported model, so a CUDA run returns only (batch, hidden) vectors to the
  host instead of (batch, seq_len, hidden) token vectors. Same semantics as
  :mod:`embfast.kernels.reference` (all-padding rows give zeros, zero rows stay zero).
- :class:`BoundRunner` runs a session with IO binding: inputs copied to the device once per batch,
  the output allocated on the device and copied back once.
- :class:`DeviceTopK` keeps a corpus resident on the device (fp32 or fp16) and runs exact top-k as a
  MatMul + TopK graph for batches of queries; on the CPU provider it is a check of the same graph.

Only onnxruntime is needed (onnxruntime-gpu for CUDA); no torch at inference time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

_POOLINGS = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len")


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)


def append_pooling(model: onnx.ModelProto, token_output: str, pooling: str, normalize: bool,
                   *, output_name: str = "sentence_embedding") -> onnx.ModelProto:
    """Return a copy of ``model`` whose only output is the pooled (batch, hidden) float32 embedding.

    Args:
        model: an exported transformer with input ``attention_mask`` (batch, seq_len) int64 and a
            token-embedding output ``token_output`` (batch, seq_len, hidden).
        pooling: mean | cls | max | lasttoken | mean_sqrt_len.
        normalize: append L2 normalization (x / max(||x||, 1e-12)).
    """
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(_POOLINGS)}, got {pooling!r}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if token_output not in [o.name for o in g.output]:
        raise ValueError(f"token_output {token_output!r} is not an output of the model")
    if _opset(m) < 18:
        raise ValueError(f"append_pooling needs opset >= 18 (reduce axes as inputs), the model has {_opset(m)}")
    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=f"pool/{out}", **attrs))
        return out

    h = token_output
    h32 = node("Cast", [h], "pool_h32", to=TensorProto.FLOAT)
    mask = node("Cast", ["attention_mask"], "pool_mask_f", to=TensorProto.FLOAT)
    ax1 = const("pool_axis1", [1], np.int64)
    ax2 = const("pool_axis2", [2], np.int64)
    m3 = node("Unsqueeze", [mask, ax2], "pool_mask3")
    count = node("ReduceSum", [mask, ax1], "pool_count", keepdims=1)  # (batch, 1)
    has_tokens = node("Greater", [count, const("pool_zero", 0.0)], "pool_has_tokens")
    if pooling in ("mean", "mean_sqrt_len"):
        masked = node("Mul", [h32, m3], "pool_masked")
        summed = node("ReduceSum", [masked, ax1], "pool_sum", keepdims=0)
        denom = count if pooling == "mean" else node("Sqrt", [count], "pool_sqrt_count")
        denom = node("Max", [denom, const("pool_eps", 1e-9)], "pool_denom")
        pooled = node("Div", [summed, denom], "pool_pooled")
    elif pooling == "cls":
        pooled = node("Gather", [h32, const("pool_idx0", 0, np.int64)], "pool_pooled", axis=1)
    elif pooling == "max":
        neg = const("pool_neginf", -np.inf)
        where = node("Where", [node("Cast", [m3], "pool_m3b", to=TensorProto.BOOL), h32, neg], "pool_where")
        pooled = node("ReduceMax", [where, ax1], "pool_pooled", keepdims=0)
    else:  # lasttoken: the last position whose mask is nonzero (left or right padding)
        seq = node("Shape", [mask], "pool_shape")
        seqlen = node("Gather", [seq, const("pool_one_i", 1, np.int64)], "pool_seqlen", axis=0)
        rng = node("Range", [const("pool_r0", 1, np.int64), node("Add", [seqlen, const("pool_r1", 1, np.int64)],
                                                                     "pool_seqlen1"),
                             const("pool_rstep", 1, np.int64)], "pool_range")  # 1..seq_len
        pos = node("Mul", [node("Cast", [rng], "pool_range_f", to=TensorProto.FLOAT), mask], "pool_pos")
        last = node("ArgMax", [pos], "pool_last", axis=1, keepdims=1)  # (batch, 1)
        idx = node("Unsqueeze", [last, ax2], "pool_last3")  # (batch, 1, 1)
        hidden = node("Gather", [node("Shape", [h32], "pool_hshape"), const("pool_two_i", 2, np.int64)],
                      "pool_hidden", axis=0)
        shape = node("Concat", [const("pool_one1", [1], np.int64), const("pool_one2", [1], np.int64),
                                node("Unsqueeze", [hidden, const("pool_ax0", [0], np.int64)], "pool_hidden1")],
                     "pool_expand_shape", axis=0)
        idx = node("Expand", [idx, shape], "pool_idx_expanded")
        picked = node("GatherElements", [h32, idx], "pool_picked", axis=1)
        pooled = node("Squeeze", [picked, ax1], "pool_pooled")
    # all-padding rows give zeros, whatever the pooling computed for them (cls keeps token 0, as the spec)
    if pooling != "cls":
        pooled = node("Where", [has_tokens, pooled, const("pool_zero_b", 0.0)], "pool_pooled_z")
    if normalize:
        sq = node("ReduceSumSquare", [pooled, ax1], "pool_sq", keepdims=1)
        norm = node("Max", [node("Sqrt", [sq], "pool_norm"), const("pool_eps12", 1e-12)], "pool_norm_c")
        pooled = node("Div", [pooled, norm], "pool_normalized")
    nodes.append(helper.make_node("Identity", [pooled], [output_name], name="pool/output"))
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch_size", None]))
    return m


def build_pooled_model(src: str | Path, dst: str | Path, token_output: str, pooling: str, normalize: bool) -> Path:
    """Write ``src`` with pooling (and normalization) appended to ``dst`` (atomically)."""
    import os
    import tempfile

    model = onnx.load(str(src))
    pooled = append_pooling(model, token_output, pooling, normalize)
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(pooled, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


class BoundRunner:
    """Run an ONNX Runtime session through IO binding on its first provider's device.

    Inputs are copied host -> device once per call; the single output is allocated on the device and
    copied back once. On the CPU provider this is an ordinary run (useful to test the code path).
    """

    def __init__(self, session, output_name: str):
        import onnxruntime as ort

        self.session = session
        self.output_name = output_name
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._ort = ort

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            ov = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            binding.bind_ortvalue_input(name, ov)
        binding.bind_output(self.output_name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def _topk_graph(dim: int, fp16: bool) -> onnx.ModelProto:
    """scores = queries (q, dim) @ corpus_t (dim, n), optional fp16 math; TopK(k) -> (q, k) values, indices.

    The corpus is kept transposed on the device, so no per-call transpose of (n, dim) is needed.
    """
    dt = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nodes = []
    q_in = "queries"
    if fp16:
        nodes.append(helper.make_node("Cast", ["queries"], ["queries_h"], to=TensorProto.FLOAT16))
        q_in = "queries_h"
    nodes += [
        helper.make_node("MatMul", [q_in, "corpus_t"], ["scores_raw"]),
        helper.make_node("Cast", ["scores_raw"], ["scores"], to=TensorProto.FLOAT),
        helper.make_node("TopK", ["scores", "k"], ["values", "indices"], axis=1, largest=1, sorted=1),
    ]
    graph = helper.make_graph(
        nodes, "embfast_topk",
        [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["q", dim]),
         helper.make_tensor_value_info("corpus_t", dt, [dim, "n"]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["q", "k"]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["q", "k"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


class DeviceTopK:
    """Exact top-k by inner product over a corpus kept on the device.

    Args:
        corpus: (n, dim) float array, L2-normalized for cosine (normalize it first with
            :func:`embfast.kernels.l2_normalize`); copied to the device once.
        device: "cuda" (needs onnxruntime-gpu and a GPU) or "cpu" (the same graph on the CPU provider).
        fp16: keep the corpus and do the matmul in fp16 (scores returned as float32).
    """

    def __init__(self, corpus: np.ndarray, *, device: str = "cuda", fp16: bool = False):
        import onnxruntime as ort

        from embfast.session import DeviceError, cuda_available, load_cuda_libraries

        corpus = np.asarray(corpus)
        if corpus.ndim != 2 or corpus.shape[0] == 0:
            raise ValueError(f"corpus must be a non-empty 2-D (n, dim) array, got shape {corpus.shape}")
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        if device == "cuda" and not cuda_available():
            raise DeviceError("DeviceTopK(device='cuda') needs onnxruntime-gpu and a CUDA GPU; this onnxruntime "
                              f"has {ort.get_available_providers()}")
        self.n, self.dim = corpus.shape
        self.fp16 = fp16
        if device == "cuda":
            load_cuda_libraries()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        model = _topk_graph(self.dim, fp16)
        self.session = ort.InferenceSession(model.SerializeToString(), providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise DeviceError("the CUDA provider did not start for DeviceTopK (no GPU or CUDA libraries missing)")
        host_t = np.ascontiguousarray(corpus.T, dtype=np.float16 if fp16 else np.float32)  # (dim, n)
        self._corpus_t = ort.OrtValue.ortvalue_from_numpy(host_t, self.device, 0)  # resident on the device
        del host_t
        self._ort = ort

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, dim) queries -> scores (q, min(k, n)) float32 and indices int64, best first."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]} but the corpus has dim {self.dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        kk = min(int(k), self.n)
        if kk == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("queries", self._ort.OrtValue.ortvalue_from_numpy(q, self.device, 0))
        binding.bind_ortvalue_input("corpus_t", self._corpus_t)
        binding.bind_cpu_input("k", np.array([kk], dtype=np.int64))
        binding.bind_output("values", self.device)
        binding.bind_output("indices", self.device)
        self.session.run_with_iobinding(binding)
        values, indices = binding.copy_outputs_to_cpu()
        return values.astype(np.float32), indices.astype(np.int64)
