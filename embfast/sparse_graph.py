"""SPLADE pooling appended to an exported masked-LM graph, so (batch, seq_len, vocab) logits never leave it.

The export (optimum, task ``fill-mask``) outputs ``logits`` (batch, seq_len, vocab). We append, as
sentence-transformers' ``SpladePooling`` computes it (Formal et al. 2021, arXiv:2109.10086)::

    masked = logits * attention_mask[:, :, None]          # padding -> 0
    max:  out = act(ReduceMax(masked, axis=1))             # act is monotonic, so pooling first is exact
    sum:  out = ReduceSum(act(masked), axis=1)
    act(x) = log1p(relu(x))  ("relu")  |  log1p(log1p(relu(x)))  ("log1p_relu")

and the graph's only output becomes ``sparse_embedding`` (batch, vocab) float32. ONNX has no Log1p;
``log1p(x)`` is ``Where(1 + x == 1, x, Log(1 + x))``: within 1.2e-7 of the true value for x >= 0 and,
unlike ``Log(1 + x)``, never turns a tiny positive weight into a zero (the same non-zero entries as
torch's ``log1p``). For max pooling the activation runs on (batch, vocab) only; ONNX Runtime still
computes the MLM head's (batch, seq_len, vocab) logits inside the graph (that GEMM is most of a SPLADE
model's time), but they stay in its arena: only (batch, vocab) floats cross to the host.
"""

from __future__ import annotations

from pathlib import Path

OUTPUT_NAME = "sparse_embedding"


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)


def append_splade_pooling(path: str | Path, pooling: str, activation: str, *, logits: str = "logits") -> None:
    """Rewrite ``path`` in place: ``logits`` (batch, seq_len, vocab) -> ``sparse_embedding`` (batch, vocab).

    Args:
        path: an ONNX file with inputs ``attention_mask`` and output ``logits``.
        pooling: "max" or "sum". activation: "relu" or "log1p_relu".

    Raises:
        ValueError: no such output or input, or an unknown pooling / activation.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if pooling not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise ValueError(f"pooling must be max or sum and activation relu or log1p_relu, got {pooling!r}, "
                         f"{activation!r}")
    path = Path(path)
    model = onnx.load(str(path))
    g = model.graph
    if logits not in [o.name for o in g.output]:
        raise ValueError(f"{path}: no output {logits!r}; outputs are {[o.name for o in g.output]}")
    if "attention_mask" not in [i.name for i in g.input]:
        raise ValueError(f"{path}: no input 'attention_mask'")
    opset = _opset(model)
    import numpy as np

    def const(name, value):
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    one = const("splade_one", np.array(1.0, np.float32))
    axis2 = const("splade_axis2", np.array([2], np.int64))
    axis1 = "splade_axis1"
    if pooling == "sum" or opset >= 18:  # ReduceSum (opset 13+) and ReduceMax (18+) take axes as an input
        const(axis1, np.array([1], np.int64))
    nodes = [helper.make_node("Cast", ["attention_mask"], ["splade_mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["splade_mask_f", axis2], ["splade_mask3"]),
             helper.make_node("Mul", [logits, "splade_mask3"], ["splade_masked"])]

    def log1p(x: str, tag: str) -> str:
        nodes.extend([helper.make_node("Add", [x, one], [f"splade_{tag}_u"]),
                      helper.make_node("Equal", [f"splade_{tag}_u", one], [f"splade_{tag}_tiny"]),
                      helper.make_node("Log", [f"splade_{tag}_u"], [f"splade_{tag}_log"]),
                      helper.make_node("Where", [f"splade_{tag}_tiny", x, f"splade_{tag}_log"], [f"splade_{tag}"])])
        return f"splade_{tag}"

    def act(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], ["splade_relu"]))
        y = log1p("splade_relu", "log1p")
        return log1p(y, "log1p2") if activation == "log1p_relu" else y

    if pooling == "max":
        if opset >= 18:
            nodes.append(helper.make_node("ReduceMax", ["splade_masked", axis1], ["splade_pooled"], keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMax", ["splade_masked"], ["splade_pooled"], axes=[1], keepdims=0))
        out = act("splade_pooled")
    else:
        y = act("splade_masked")
        nodes.append(helper.make_node("ReduceSum", [y, axis1], ["splade_pooled"], keepdims=0))
        out = "splade_pooled"
    nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME]))
    g.node.extend(nodes)
    vocab = None
    for o in g.output:
        if o.name == logits:
            dims = o.type.tensor_type.shape.dim
            vocab = dims[2].dim_value if len(dims) == 3 and dims[2].dim_value else None
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch_size", vocab or "vocab"]))
    onnx.checker.check_model(model)
    big = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(path), save_as_external_data=big, location=f"{path.name}_data" if big else None)
