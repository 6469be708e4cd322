"""embfast's ONNX Runtime custom operator ai.embfast::RowQuantMatMul (csrc/ortops.cpp, csrc/embfast/rowgemm.hpp)
against its NumPy reference (embfast.ortops.row_quant_matmul_reference), on every code path this CPU runs
(AVX-512 VNNI, AVX2, generic C++): the same bits, rows independent of their batch, and clear errors.
The fused graph it serves (embfast.rowquant.quantize_rows_fused) is checked on the real model in
tests/test_precision.py and tests/test_batch_invariance.py."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from embfast import ortops

pytestmark = pytest.mark.skipif(not ortops.available() and os.environ.get("EMBFAST_REQUIRE_NATIVE") != "1",
                                reason="embfast was installed without its native build")


@pytest.fixture(params=["generic", "avx2", "auto"])
def path(request, monkeypatch):
    """Each code path (the kernel reads EMBFAST_ISA when a session creates it); skipped where the CPU lacks it."""
    monkeypatch.setenv("EMBFAST_ISA", request.param)
    label = ortops.isa()
    if request.param == "avx2" and label != "avx2":
        pytest.skip("this CPU has no AVX2")
    if request.param == "auto" and label in ("generic", "avx2"):
        pytest.skip(f"the best path on this CPU is {label}, tested already")
    return label


CASES = [  # rows (B, S), K, N, quantization, GELU, residual, smoothing, bias
    ((2, 7), 40, 50, "symmetric", False, False, False, False),
    ((3, 33), 384, 1152, "symmetric", False, False, True, True),
    ((2, 65), 384, 1536, "symmetric", True, False, True, True),
    ((2, 64), 1536, 384, "shifted", False, True, False, True),
    ((1, 1), 37, 17, "symmetric", False, True, False, True),  # K not a multiple of 4, N of 16
    ((5, 3), 130, 33, "shifted", True, True, True, False),
]


def _case(rng, shape, K, N, mode, gelu, residual, smooth, bias):
    x = rng.standard_normal((*shape, K)).astype(np.float32) * 3
    if mode == "shifted":
        x = np.maximum(x, np.float32(-0.17))
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    kw = dict(zero_point=16, levels=239.0, floor=2.5, shifted=True) if mode == "shifted" else {}
    return dict(x=x, w_q=w, col_scale=(rng.random(N) * 1e-3).astype(np.float32),
                bias=rng.standard_normal(N).astype(np.float32) if bias else None,
                smooth=(rng.random(K) + 0.5).astype(np.float32) if smooth else None,
                residual=rng.standard_normal((*shape, N)).astype(np.float32) if residual else None,
                activation=1 if gelu else 0, **kw)


def _run(case, threads=2, rows=None):
    kw = {k: v for k, v in case.items() if k not in ("x", "w_q", "col_scale", "bias", "smooth", "residual")}
    sess = ortops.session(ortops.row_quant_matmul_model(case["w_q"], case["col_scale"], case["bias"], case["smooth"],
                                                         residual=case["residual"] is not None, **kw), threads)
    sl = (slice(None),) if rows is None else rows
    feeds = {"x": case["x"][sl]}
    if case["residual"] is not None:
        feeds["r"] = case["residual"][sl]
    return sess.run(None, feeds)[0]


def _reference(case):
    return ortops.row_quant_matmul_reference(**case)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_row_quant_matmul_equals_its_reference_bit_for_bit(path, i):
    rng = np.random.default_rng(i)
    case = _case(rng, *CASES[i])
    y, ref = _run(case), _reference(case)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.array_equal(y, ref), f"{path}: max abs difference {np.abs(y - ref).max()}"


def test_a_row_gets_the_same_bits_alone_and_in_any_batch(path):
    """One activation scale per row and exact integer products: a row's output does not depend on its
    batch-mates, on padding, or on how the rows are split between threads."""
    rng = np.random.default_rng(7)
    case = _case(rng, (4, 29), 384, 1536, "symmetric", True, True, True, True)
    case["x"][1, 3] *= 1000  # an outlier row in the batch
    full = _run(case)
    for threads in (1, 2):
        for b, s in ((0, 0), (2, 28), (3, 5)):
            alone = _run(case, threads, rows=(slice(b, b + 1), slice(s, s + 1)))
            assert np.array_equal(alone[0, 0], full[b, s])


def test_split_writes_q_k_and_v_as_three_outputs(path):
    """split=3 (a QKV projection): the three outputs are the reference's thirds, bit for bit."""
    rng = np.random.default_rng(11)
    case = _case(rng, (3, 21), 384, 1152, "symmetric", False, False, True, True)
    kw = {"zero_point": 128, "levels": 127.0, "floor": 1e-30, "shifted": False, "activation": 0}
    sess = ortops.session(ortops.row_quant_matmul_model(case["w_q"], case["col_scale"], case["bias"], case["smooth"],
                                                         split=3, **kw))
    outs = sess.run(None, {"x": case["x"]})
    ref = _reference(case)
    assert len(outs) == 3 and all(o.shape == (3, 21, 384) for o in outs)
    assert np.array_equal(np.concatenate(outs, axis=-1), ref)
    with pytest.raises(Exception, match="split must be 1, or 3"):
        ortops.session(ortops.row_quant_matmul_model(case["w_q"][:, :96 * 3 - 32], case["col_scale"][:256], split=3))


def test_gelu_is_within_float_rounding_of_the_erf_form():
    x = np.linspace(-12, 12, 200001, dtype=np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    error = np.abs(ortops.gelu_reference(x) - exact)
    assert (error <= 3e-7 * np.maximum(1.0, np.abs(x))).all(), float(error.max())


def test_rows_of_zeros_and_extreme_values(path):
    """A row of zeros takes the floor as its scale (no division by zero): its output is the bias; huge and tiny
    rows are quantized by their own scale."""
    rng = np.random.default_rng(3)
    case = _case(rng, (1, 4), 64, 48, "symmetric", False, False, False, True)
    case["x"][0, 0] = 0
    case["x"][0, 1] *= 1e30
    case["x"][0, 2] *= 1e-30
    y = _run(case)
    assert np.isfinite(y).all()
    assert np.array_equal(y[0, 0], case["bias"])
    assert np.array_equal(y, _reference(case))


def _bad_model(weights_as_input=False, k=8, n=16):
    w = numpy_helper.from_array(np.ones((k, n), np.int8), "w")
    s = numpy_helper.from_array(np.ones(n, np.float32), "s")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "K"])]
    inits = [s]
    if weights_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.INT8, [k, n]))
    else:
        inits.append(w)
    node = helper.make_node("RowQuantMatMul", ["x", "w", "s"], ["y"], domain=ortops.DOMAIN)
    graph = helper.make_graph([node], "bad", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ortops.DOMAIN, 1)])
    model.ir_version = 8
    return model


def test_bad_graphs_and_inputs_get_clear_errors():
    with pytest.raises(Exception, match="W must be a 2-D int8 initializer|must be an initializer"):
        ortops.session(_bad_model(weights_as_input=True)).run(None, {"x": np.ones((1, 2, 8), np.float32),
                                                                      "w": np.ones((8, 16), np.int8)})
    sess = ortops.session(_bad_model())
    with pytest.raises(Exception, match="last dimension of 8"):
        sess.run(None, {"x": np.ones((1, 2, 9), np.float32)})
    assert sess.run(None, {"x": np.ones((1, 2, 8), np.float32)})[0].shape == (1, 2, 16)
    assert sess.run(None, {"x": np.ones((0, 2, 8), np.float32)})[0].shape == (0, 2, 16)
    rng = np.random.default_rng(0)
    case = _case(rng, (1, 3), 16, 16, "symmetric", False, True, False, True)
    model = ortops.row_quant_matmul_model(case["w_q"], case["col_scale"], case["bias"], residual=True)
    with pytest.raises(Exception, match="residual must be float and shaped as the output"):
        ortops.session(model).run(None, {"x": case["x"], "r": case["residual"][:, :2]})
    onnx.checker.check_model(model)


def test_missing_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(ortops, "__file__", str(tmp_path / "ortops.py"))
    assert not ortops.available()
    with pytest.raises(ortops.OpsLibraryMissing, match="native build"):
        ortops.library_path()
