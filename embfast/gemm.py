"""Tile products for the self-joins (paraphrase mining, community detection, near-duplicates) through ONNX
Runtime's MLAS GEMMs: float32 ``A @ B.T`` (``Gemm`` with transB) and exact integer ``(A - 128) @ B`` (uint8 x int8
``MatMulInteger``, see :mod:`embfast.screen`).

Why not NumPy's BLAS: on the 20k self-join of real sentences, MLAS's sgemm took 0.50 s against OpenBLAS's 1.0-1.1
s, and the native heap merges that follow each product ran twice as fast (0.55 against 1.0 s), because
OpenBLAS's worker threads spin after every product and take the cores from them; these sessions never spin
(``session.intra_op.allow_spinning`` 0). Their thread count is fixed per session, so results do not depend on
the calling thread. One cached session per (kind, threads); ``run_with_iobinding`` writes into the caller's
buffer, so a join allocates its output tile once.
"""

from __future__ import annotations

import threading

import numpy as np

_sessions: dict[tuple[str, int], object] = {}
_lock = threading.Lock()


def threads_or_default(threads: int) -> int:
    """``threads`` if > 0, else ``EMBFAST_THREADS`` or the cores this process may use."""
    if threads > 0:
        return threads
    from embfast.session import default_threads

    return default_threads()


def _model(kind: str) -> bytes:
    from onnx import TensorProto, helper

    if kind == "float":
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None]) for n in ("A", "B")]
        out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None])
        nodes, inits = [helper.make_node("Gemm", ["A", "B"], ["Y"], transB=1)], []
    else:
        inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, None]),
                  helper.make_tensor_value_info("B", TensorProto.INT8, [None, None])]
        out = helper.make_tensor_value_info("Y", TensorProto.INT32, [None, None])
        nodes = [helper.make_node("MatMulInteger", ["A", "B", "za"], ["Y"])]
        inits = [helper.make_tensor("za", TensorProto.UINT8, [], [128])]
    graph = helper.make_graph(nodes, f"embfast-{kind}-products", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def session(kind: str, threads: int = 0):
    """The cached ONNX Runtime session of ``kind`` ("float" or "int8") on ``threads`` intra-op threads."""
    key = (kind, threads_or_default(threads))
    with _lock:
        sess = _sessions.get(key)
        if sess is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = key[1]
            opts.log_severity_level = 3
            # no spinning after a run: the native merges or screen run next on the same cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = _sessions[key] = ort.InferenceSession(_model(kind), opts, providers=["CPUExecutionProvider"])
        return sess


def _run(kind: str, a: np.ndarray, b: np.ndarray, shape: tuple[int, int], dtype, out, threads: int) -> np.ndarray:
    sess = session(kind, threads)
    if out is None:
        return sess.run(None, {"A": a, "B": b})[0]
    y = out[: shape[0] * shape[1]].reshape(shape)
    io = sess.io_binding()
    io.bind_cpu_input("A", a)
    io.bind_cpu_input("B", b)
    io.bind_output("Y", "cpu", 0, dtype, list(shape), y.ctypes.data)
    sess.run_with_iobinding(io)
    return y


def float_products(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
    """``a @ b.T`` for float32 C-contiguous (m, d) and (n, d): (m, n) float32. ``out``: a flat float32 buffer of at
    least m n entries to write into (the result is a view of it)."""
    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return _run("float", a, b, (a.shape[0], b.shape[0]), np.float32, out, threads)


def int8_products(qa: np.ndarray, qb_t: np.ndarray, *, out: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
    """``(qa - 128) @ qb_t`` for uint8 (m, d) and int8 (d, n), C-contiguous: (m, n) int32, exact where MLAS's kernel
    is (see :func:`embfast.screen.exact_products`). ``out``: a flat int32 buffer, as for :func:`float_products`."""
    return _run("int8", qa, qb_t, (qa.shape[0], qb_t.shape[1]), np.int32, out, threads)
