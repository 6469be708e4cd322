"""Precision variants (fp32 fused, int8, fp16): built once, rebuilt when their recipe changes, accurate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from embfast import Embedder
from embfast.export import MANIFEST, ensure_exported, read_manifest
from embfast.session import CPU_DISABLED_OPTIMIZERS, OnnxSession
from embfast.variants import VARIANT_FILES, VARIANT_FORMAT, ensure_variant

# varied real-looking texts: short and long, questions, numbers, code, non-English
TEXTS = [
    "A man is playing a guitar.", "The new movie is awesome.", "How do I reset my password?",
    "Stock markets fell sharply after the central bank raised interest rates for the third time this year.",
    "Proteins fold into three-dimensional structures determined by their amino-acid sequence.",
    "def add(a, b): return a + b", "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。", "ok", "Vaccines train the immune system to recognise a pathogen.",
    "The patient was given 5 mg of the drug twice a day for two weeks.",
    "Children are playing soccer in the park while their parents watch.",
] + [f"Sentence number {i} talks about {topic} in some detail, with {i % 7} extra words here."
     for i, topic in enumerate(["climate", "finance", "football", "cooking", "genetics", "music",
                                "law", "travel", "astronomy", "software"] * 3)]


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fp32_variant_is_fused_without_skip_layer_norm(tiny_dir):
    folder = ensure_exported(tiny_dir)
    path = ensure_variant(folder, "fp32")
    assert path.name == VARIANT_FILES["fp32"]
    ops = _ops(path)
    assert "Attention" in ops and "SkipLayerNormalization" not in ops
    check = read_manifest(folder)["variant_checks"]["fp32"]
    assert check["format"] == VARIANT_FORMAT and check["probe_min_cosine"] >= 0.99999


def test_cpu_sessions_keep_skip_layer_norm_apart(tmp_path):
    """ORT fuses Add + LayerNormalization into its slow CPU SkipLayerNormalization at session level
    where it can prove the shapes; CPU sessions disable that fusion."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = 64
    inits = [numpy_helper.from_array(np.ones(hidden, np.float32), "g"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "s"], ["a"]),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-12)], "add_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", hidden]) for n in ("x", "s")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    path = tmp_path / "add_ln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))

    def optimized_ops(disabled):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(tmp_path / f"opt{len(disabled)}.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return _ops(opts.optimized_model_filepath)

    assert optimized_ops([]) == {"SkipLayerNormalization"}  # the fusion is real, so disabling it matters
    assert "SkipLayerNormalization" not in optimized_ops(CPU_DISABLED_OPTIMIZERS)
    session = OnnxSession(path, threads=1, output_name="y", token_output=False)  # runs with the list
    x = np.random.default_rng(0).standard_normal((2, 3, hidden)).astype(np.float32)
    y = session.session.run(None, {"x": x, "s": x})[0]
    ref = (2 * x - (2 * x).mean(-1, keepdims=True)) / np.sqrt((2 * x).var(-1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_variants_are_built_once_and_rebuilt_when_their_recipe_changes(tiny_dir, monkeypatch):
    monkeypatch.setenv("EMBFAST_INT8_RECIPE", "dynamic")  # the per-tensor variant ("int8")
    folder = ensure_exported(tiny_dir)
    path = ensure_variant(folder, "int8")
    stamp = path.stat().st_mtime_ns
    assert ensure_variant(folder, "int8").stat().st_mtime_ns == stamp  # reused
    manifest = read_manifest(folder)
    for precision in ("fp32", "int8"):  # as an older embfast recorded them
        manifest["variant_checks"][precision].pop("format")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    rebuilt = ensure_variant(folder, "int8")
    assert rebuilt.stat().st_mtime_ns != stamp
    checks = read_manifest(folder)["variant_checks"]
    assert checks["int8"]["format"] == checks["fp32"]["format"] == VARIANT_FORMAT  # fp32 rebuilt first
    ops = _ops(rebuilt)
    assert "SkipLayerNormalization" not in ops and {"MatMulInteger", "QAttention"} & ops


def test_int8_default_is_the_fused_per_row_variant(minilm_dir, monkeypatch):
    """precision="int8" runs the int8-rows variant (issue 14): attention split, every MatMul one fused per-row
    RowQuantMatMul (bias, residual and GELU taken in), smoothing calibrated, nothing quantized per tensor.
    EMBFAST_INT8_RECIPE=dynamic still builds ONNX Runtime's per-tensor variant beside it. A variant recorded
    with another recipe (the graph form, from before the operators existed) is rebuilt. On the real
    all-MiniLM-L6-v2: int8 of tiny random models is a poor target (tests/test_batch_invariance.py)."""
    folder = ensure_exported(minilm_dir)
    path = ensure_variant(folder, "int8")
    assert path.name == VARIANT_FILES["int8-rows"]
    ops = _ops(path)
    assert ops == {"RowQuantMatMul", "MultiHeadAttention", "LayerNormalization", "EmbedLayerNormalization", "Cast"}
    check = read_manifest(folder)["variant_checks"]["int8-rows"]
    assert check["recipe"] == "rowquant-fused-2" and check["smoothed_inputs"] > 0 and check["format"] == VARIANT_FORMAT
    fused = [check[k] for k in ("matmuls_quantized", "bias_fused", "residual_fused", "gelu_fused", "split_fused")]
    assert fused == [24, 18, 12, 6, 6]  # 6 of the biases were MultiHeadAttention's
    assert Embedder(minilm_dir, precision="int8").encode(TEXTS[:3]).shape == (3, 384)
    manifest = read_manifest(folder)
    manifest["variant_checks"]["int8-rows"]["recipe"] = "rowquant-u8s8"  # as the graph form recorded it
    (folder / MANIFEST).write_text(json.dumps(manifest))
    stamp = path.stat().st_mtime_ns
    assert ensure_variant(folder, "int8").stat().st_mtime_ns != stamp
    monkeypatch.setenv("EMBFAST_INT8_RECIPE", "dynamic")
    dynamic = ensure_variant(folder, "int8")
    assert dynamic.name == VARIANT_FILES["int8"] and {"MatMulInteger", "QAttention"} & _ops(dynamic)
    monkeypatch.setenv("EMBFAST_INT8_RECIPE", "nonsense")
    with pytest.raises(ValueError, match="EMBFAST_INT8_RECIPE"):
        ensure_variant(folder, "int8")


def test_graph_form_of_the_per_row_recipe_matches_the_fused_operators(minilm_dir, tmp_path):
    """Without the operator library the recipe is written with ONNX Runtime's own operators (MatMulIntegerToFloat
    and element-wise nodes). Both forms quantize the same rows the same way, so both stay as close to fp32; they
    are not bit-equal (the operator's GELU is a polynomial, and a rounding step moves an activation by a level,
    which a text of one or two tokens feels most: 0.9967 between the two forms for one such text here)."""
    from embfast.rowquant import build_rowquant, calibration_feeds
    from embfast.session import OnnxSession
    from embfast.variants import _probe_tokenizer

    folder = ensure_exported(minilm_dir)
    manifest = read_manifest(folder)
    feeds = calibration_feeds(_probe_tokenizer(folder, manifest))
    src = ensure_variant(folder, "fp32")
    graph, fused = tmp_path / "graph.onnx", tmp_path / "fused.onnx"
    assert build_rowquant(src, graph, calibration=feeds, fused=False)["recipe"] == "rowquant-u8s8"
    assert build_rowquant(src, fused, calibration=feeds, fused=True)["recipe"] == "rowquant-fused-2"
    assert "RowQuantMatMul" not in _ops(graph) and "MatMulIntegerToFloat" in _ops(graph)
    pooled = []
    for path in (src, graph, fused):
        sess = OnnxSession(path, threads=1, output_name=manifest["output_name"])
        vecs = []
        for f in feeds:  # mean pooling, unit length
            m = f["attention_mask"][..., None].astype(np.float32)
            v = (sess.run({n: f[n] for n in sess.input_names}) * m).sum(1)
            vecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        pooled.append(np.concatenate(vecs))
    fp32, by_graph, by_op = pooled
    to_fp32 = [(fp32 * v).sum(1).min() for v in (by_graph, by_op)]
    assert min(to_fp32) >= 0.99 and abs(to_fp32[0] - to_fp32[1]) <= 0.003, to_fp32
    assert (by_graph * by_op).sum(1).min() >= 0.99


def test_fp16_variant_keeps_float32_io(tiny_dir):
    folder = ensure_exported(tiny_dir)
    model = onnx.load(str(ensure_variant(folder, "fp16")))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    out = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert out["last_hidden_state"] == onnx.TensorProto.FLOAT
    with pytest.raises(ValueError, match="fp16"):
        Embedder(tiny_dir, device="cpu", precision="fp16")


def test_int8_stays_close_to_fp32_on_the_real_model(minilm):
    """The shipped int8 recipe on all-MiniLM-L6-v2: close to fp32 per text, and it ranks the same."""
    int8 = Embedder(precision="int8")
    assert int8.precision == "int8" and int8.session.session.get_providers() == ["CPUExecutionProvider"]
    a, b = int8.encode(TEXTS), minilm.encode(TEXTS)
    cos = (a * b).sum(1)
    assert cos.mean() >= 0.985 and cos.min() >= 0.93, (cos.mean(), cos.min())
    upper = np.triu_indices(len(TEXTS), 1)  # all pairwise similarities, ranked the same way?
    ranks = [np.argsort(np.argsort(m[upper])) for m in (a @ a.T, b @ b.T)]
    assert np.corrcoef(*ranks)[0, 1] >= 0.98
