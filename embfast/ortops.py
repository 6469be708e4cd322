"""embfast's ONNX Runtime custom operators (``csrc/ortops.cpp``, built with the native core as
``embfast/_ortops.so``), and the NumPy reference they are checked against.

``ai.embfast::RowQuantMatMul`` is the per-row int8 product of :mod:`embfast.rowquant` as one operator: each
row (token) of the input is smoothed, scaled by its own maximum and quantized to uint8, multiplied by int8
weights exactly (AVX-512 VNNI, AVX2 or portable C++), and scaled back, with the bias, a residual and GELU
applied in the same pass. ONNX Runtime's graph form of the same recipe takes 7-9 element-wise passes around
each ``MatMulIntegerToFloat``; this one reads its input once and writes its output once.

A session whose graph uses these operators registers the library with :func:`register`. With
``EMBFAST_REQUIRE_NATIVE=1`` importing this module fails when the library is missing (CI never falls back
silently to the slower graph form of the recipe).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import numpy as np

DOMAIN = "ai.embfast"
LIBRARY_NAME = "_ortops.so"


class OpsLibraryMissing(RuntimeError):
    """The custom-operator library was not built (an install without the native core)."""


def library_path() -> Path:
    """The shared library's path (``embfast/_ortops.so``, next to the package's modules).

    Raises:
        OpsLibraryMissing: it is not there (embfast was installed without its native build).
    """
    path = Path(__file__).with_name(LIBRARY_NAME)
    if not path.is_file():
        raise OpsLibraryMissing(f"{path} is missing: embfast was installed without its native build "
                                "(pip install --no-build-isolation . with a C++ compiler, CMake and pybind11)")
    return path


def available() -> bool:
    """True when the custom-operator library is installed."""
    try:
        library_path()
    except OpsLibraryMissing:
        return False
    return True


def register(opts) -> None:
    """Register the custom operators on ``opts`` (an ``onnxruntime.SessionOptions``).

    Raises:
        OpsLibraryMissing: the library is not installed.
    """
    opts.register_custom_ops_library(str(library_path()))


if os.environ.get("EMBFAST_REQUIRE_NATIVE") == "1" and not available():  # as embfast.kernels does for the core
    raise ImportError(f"EMBFAST_REQUIRE_NATIVE=1 but {Path(__file__).with_name(LIBRARY_NAME)} is missing: "
                      "embfast was installed without its native build")


def session_options(threads: int = 0):
    """``onnxruntime.SessionOptions`` with these operators registered when the library is installed
    (``threads`` > 0 sets the intra-op thread count)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = threads
    if available():
        register(opts)
    return opts


@cache
def _lib():
    lib = ctypes.CDLL(str(library_path()))
    lib.embfast_rowgemm_isa.restype = ctypes.c_char_p
    return lib


def isa() -> str:
    """The path RowQuantMatMul kernels created now take: "avx512vnni", "avx2" or "generic" (the CPU's best,
    lowered by ``EMBFAST_ISA=generic`` or ``EMBFAST_ISA=avx2``, read when a session is created)."""
    return _lib().embfast_rowgemm_isa().decode()


# GELU as the operator computes it (erf by Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7; exp by range
# reduction and a degree-6 polynomial), one float32 operation at a time in the operator's order.
_P, _A = np.float32(0.3275911), [np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027,
                                                          1.061405429)]
_E = [np.float32(e) for e in (0.5, 0.166666671633720398, 4.16666716337203979e-2, 8.33333376795053482e-3,
                              1.38888892251253128e-3)]
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693145751953125), np.float32(1.42860682030941723e-6)
_ONE, _HALF = np.float32(1.0), np.float32(0.5)


def _exp_neg(x: np.ndarray) -> np.ndarray:
    x = np.maximum(x, np.float32(-87.0))
    n = np.rint(x * _LOG2E)
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _E[4]
    for c in (_E[3], _E[2], _E[1], _E[0], _ONE, _ONE):
        p = p * r + c
    return np.ldexp(p, n.astype(np.int32)).astype(np.float32)


def gelu_reference(x: np.ndarray) -> np.ndarray:
    """GELU (erf form) as RowQuantMatMul computes it, float32; within 3e-7 of the exact function."""
    x = np.asarray(x, np.float32)
    z = x * np.float32(0.70710678118654752)
    a = np.abs(z)
    t = _ONE / (_ONE + _P * a)
    poly = _A[4]
    for c in (_A[3], _A[2], _A[1], _A[0]):
        poly = poly * t + c
    poly = poly * t
    erf_abs = _ONE - poly * _exp_neg(-(a * a))
    erf = np.where(z < 0, -erf_abs, erf_abs)
    return (_HALF * x) * (_ONE + erf)


def row_quant_matmul_reference(x, w_q, col_scale, bias=None, smooth=None, residual=None, *, zero_point: int = 128,
                               levels: float = 127.0, floor: float = 1e-30, shifted: bool = False,
                               activation: int = 0) -> np.ndarray:
    """What ``ai.embfast::RowQuantMatMul`` computes (the spec of the native kernels), float32.

    Args:
        x: (..., K) float32 input rows.
        w_q: (K, N) int8 weights.
        col_scale: (N,) float32, the weights' per-column scale over ``levels``.
        bias: (N,) float32 or None.
        smooth: (K,) float32 per-channel multiplier applied to ``x`` first (SmoothQuant), or None.
        residual: (..., N) float32 added to the output, or None.
        zero_point, levels, floor, shifted: the row quantization: ``amax = max(max |v|, floor)`` (or the
            plain maximum when ``shifted``), ``q = clip(rint(v * (levels / amax)) + zero_point, 0, 255)``.
        activation: 0 none, 1 GELU (:func:`gelu_reference`).

    Returns:
        (..., N) float32: ``act(float(sum (q - zp) w) * col_scale * amax + bias + residual)``.
    """
    x = np.asarray(x, np.float32)
    v = x * np.asarray(smooth, np.float32) if smooth is not None else x
    m = v.max(axis=-1, keepdims=True) if shifted else np.abs(v).max(axis=-1, keepdims=True)
    amax = np.maximum(m, np.float32(floor)).astype(np.float32)
    inv = np.float32(levels) / amax
    q = np.clip(np.rint(v * inv) + np.float32(zero_point), 0, 255)
    acc = (q.astype(np.int64) - zero_point) @ np.asarray(w_q, np.int64)
    y = acc.astype(np.float32) * np.asarray(col_scale, np.float32)
    y = y * amax
    y = y + (np.asarray(bias, np.float32) if bias is not None else np.float32(0))
    if residual is not None:
        y = y + np.asarray(residual, np.float32)
    if activation == 1:
        y = gelu_reference(y)
    return y.astype(np.float32)


def row_quant_matmul_model(w_q, col_scale, bias=None, smooth=None, *, residual: bool = False, zero_point: int = 128,
                           levels: float = 127.0, floor: float = 1e-30, shifted: bool = False, activation: int = 0,
                           split: int = 1):
    """A one-node ONNX model of RowQuantMatMul (inputs ``x`` (rows..., K) and, with ``residual``, ``r``;
    output ``y``, or ``y0``, ``y1``, ``y2`` with ``split=3``), for tests and benchmarks."""
    from onnx import TensorProto, helper, numpy_helper

    K, N = np.asarray(w_q).shape
    inits = [numpy_helper.from_array(np.asarray(w_q, np.int8), "w"),
             numpy_helper.from_array(np.asarray(col_scale, np.float32), "s")]
    names = ["x", "w", "s", "", "", ""]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "b"))
        names[3] = "b"
    if smooth is not None:
        inits.append(numpy_helper.from_array(np.asarray(smooth, np.float32), "m"))
        names[4] = "m"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])]
    if residual:
        names[5] = "r"
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["B", "S", N]))
    while names and not names[-1]:
        names.pop()
    outs = ["y"] if split == 1 else [f"y{i}" for i in range(split)]
    node = helper.make_node("RowQuantMatMul", names, outs, domain=DOMAIN, zero_point=zero_point, levels=float(levels),
                            floor=float(floor), shifted=int(shifted), activation=activation, split=split)
    info = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", "S", N // split]) for o in outs]
    graph = helper.make_graph([node], "rowquant", inputs, info, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model


def session(model, threads: int = 0):
    """An ONNX Runtime CPU session of ``model`` (an ONNX ModelProto or bytes) with the operators registered."""
    import onnxruntime as ort

    library_path()  # raises OpsLibraryMissing, with the reason, when it is not installed
    opts = session_options(threads)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
