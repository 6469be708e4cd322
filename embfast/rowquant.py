"""int8 with one activation scale per row (per token): a graph rewrite that makes int8 batch-invariant.

ONNX Runtime's dynamic quantization (``quantize_dynamic``) quantizes each MatMul's activations
with one scale for the whole tensor, computed at run time from the batch: a text's vector then
depends on its batch-mates (cosine 0.98 for a short text alone vs next to a long passage). This
module rewrites a float graph so that every quantized MatMul scales each row of its input
(one token's hidden vector) by that row's own maximum:

    a      = max(|x|) over the row, at least 1e-30            (ReduceMax, ReduceMin, Neg, Max)
    x_q    = round(x * 127 / a) + 128  as uint8               (Div, Mul, QuantizeLinear: zero point 128)
    y      = (x_q - 128) @ W_q * (s_w / 127) * a              (MatMulIntegerToFloat, Mul)

with ``W_q`` the int8 weights, one symmetric scale ``s_w`` per output column. Two refinements keep it
within 0.995 cosine of fp32 on real text (all-MiniLM-L6-v2; benchmarks/README.md):

- SmoothQuant smoothing of the inputs a LayerNorm produces (attention and feed-forward inputs): BERT's
  few outlier channels would otherwise set every row's scale and leave the other channels a handful of
  levels. ``x / s`` and ``s * W`` per input channel, ``s`` from activation ranges measured once on
  :data:`CALIBRATION_TEXTS` when the variant is built (constants: no batch dependence).
- GELU outputs (>= -0.17) are quantized with zero point 16 instead of 128: 239 levels for the positive
  side instead of 127, the row scale floored so that -0.17 stays representable.

Integer matrix products are exact and every other step is element-wise or per row, so a row's
result is the same bits whatever else is in the batch, however long the batch is padded and however
ONNX Runtime tiles or threads the product.

Two forms of the same recipe. :func:`quantize_rows_fused` (the default when embfast's operator library is
installed) makes each MatMul one ``ai.embfast::RowQuantMatMul`` (:mod:`embfast.ortops`) that also takes in the
bias, the residual, GELU and the QKV Split: 1.07-1.11x the speed of ONNX Runtime's per-tensor recipe on a 2-core
AVX-512 VNNI CPU.
:func:`quantize_rows` writes it with ONNX Runtime's own operators (a row reduction, scaling and quantizing
before each ``MatMulIntegerToFloat``, a row-scaling Mul after): 0.79-0.87x, from the extra element-wise passes
(benchmarks/README.md). :mod:`embfast.variants` builds it as variant ``int8-rows``, the default int8.

The fused ``Attention`` node (input projection inside, quantized by ``quantize_dynamic`` into
``QAttention`` with one input scale per tensor) is split first into its projection, a MatMul
that gets quantized like the others, and ``MultiHeadAttention`` (com.microsoft) for the
attention itself, which stays in float32 (as it does in the ``QAttention`` recipe).

Embedding tables, LayerNorms, GELU, softmax and small heads (fewer than :data:`MIN_DIM` outputs
or inputs, e.g. a cross-encoder's label layer) stay in float32.

Why not ``MatMulNBits`` with 8-bit weights and ``accuracy_level=4`` (MLAS quantizes activations
per row and block): its kernels take rows in tiles and round a row differently in a tile of one
than in a tile of two, so a row's output moves by about 1e-6 with the batch's row count, and
later per-row roundings turn that into up to 4e-3 on the final vector (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np

# MatMuls with fewer input or output features than this stay float32 (tiny heads, no speed to gain).
MIN_DIM = 16
ALPHA = 0.5  # SmoothQuant's migration strength (its paper's default; 0.3-0.7 measured within 0.0005 of it)
RECIPE = "rowquant-u8s8"  # the graph form (ONNX Runtime's own operators)
RECIPE_FUSED = "rowquant-fused-2"  # one ai.embfast::RowQuantMatMul per MatMul (embfast.ortops)


def fused_available() -> bool:
    """True when the fused operator's library is installed (:func:`embfast.ortops.available`)."""
    from embfast import ortops

    return ortops.available()


def current_recipe(fused: bool | None = None) -> str:
    """The recipe a new ``int8-rows`` variant gets: :data:`RECIPE_FUSED` when the operator library is
    installed, else :data:`RECIPE`."""
    return RECIPE_FUSED if (fused_available() if fused is None else fused) else RECIPE



def split_attention(model) -> int:
    """Replace each com.microsoft ``Attention`` node of ``model`` (in place) by MatMul + Split +
    ``MultiHeadAttention``; returns how many were replaced.

    Only the plain self-attention form is rewritten: input, weights (an initializer), bias, and an
    optional key-padding mask; no past state, relative-position bias, unidirectional flag or unequal
    Q/K/V widths. Others are left as they are.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, replaced = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * (4 - len(node.input))
        plain = (node.op_type == "Attention" and node.domain == "com.microsoft" and inputs[1] in inits
                 and inputs[2] in inits and all(not n for n in node.input[4:])
                 and not attrs.get("unidirectional", 0) and not attrs.get("qkv_hidden_sizes")
                 and not attrs.get("do_rotary", 0) and "past_present_share_buffer" not in attrs)
        if not plain:
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[inputs[1]])
        hidden = weight.shape[1] // 3
        if weight.ndim != 2 or weight.shape[1] != 3 * hidden:
            new_nodes.append(node)
            continue
        base = node.name or node.output[0]
        qkv, split = f"{base}_qkv", f"{base}_qkv_split"
        graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, np.int64), split))
        q, k, v = (f"{base}_{x}" for x in "qkv")
        new_nodes.append(helper.make_node("MatMul", [inputs[0], inputs[1]], [qkv], name=f"{base}_proj"))
        new_nodes.append(helper.make_node("Split", [qkv, split], [q, k, v], name=f"{base}_split", axis=-1))
        mha_attrs = {"num_heads": attrs["num_heads"]}
        for name in ("mask_filter_value", "scale"):
            if name in attrs:
                mha_attrs[name] = attrs[name]
        new_nodes.append(helper.make_node("MultiHeadAttention", [q, k, v, inputs[2], inputs[3]], list(node.output),
                                          name=f"{base}_mha", domain="com.microsoft", **mha_attrs))
        replaced += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return replaced


WEIGHT_MAX = 127


def quantize_weight(w: np.ndarray, qmax: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights, one scale per output column: ``w ~= w_q * scale``.

    Args:
        w: (in_features, out_features) float.

    Returns:
        ``w_q`` (in_features, out_features) int8 in [-127, 127] and ``scale`` (out_features,) float32
        (a zero column gets scale 1 and zero weights).
    """
    qmax = WEIGHT_MAX if qmax is None else qmax
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=0) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    w_q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return w_q, scale


GELU_OPS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}
LAYER_NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                  "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization"}
# GELU's outputs are >= GELU_MIN: their rows are quantized with zero point SHIFTED_ZP instead of 128, so the
# positive side gets 255 - SHIFTED_ZP levels instead of 127; the row scale is at least what keeps GELU_MIN
# representable (SHIFTED_ZP steps below zero), so nothing clips.
GELU_MIN = 0.17
SHIFTED_ZP = 16
SHIFTED_LEVELS = 255.0 - SHIFTED_ZP
SHIFTED_FLOOR = GELU_MIN * SHIFTED_LEVELS / SHIFTED_ZP




def _quantizable(node, inits, exclude) -> bool:
    from onnx import TensorProto

    w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
    return (w is not None and w.data_type == TensorProto.FLOAT and len(w.dims) == 2 and min(w.dims) >= MIN_DIM
            and node.name not in exclude)


def _smoothing_factors(targets, weights, smooth: dict, alpha: float) -> dict[str, np.ndarray]:
    """SmoothQuant's per-channel factor ``s`` for each smoothed input (see :func:`quantize_rows`)."""
    factors: dict[str, np.ndarray] = {}
    for x in {n.input[0] for n in targets} & set(smooth):
        w_amax = np.max([np.abs(weights[n.name]).max(axis=1) for n in targets if n.input[0] == x], axis=0)
        s = np.power(np.maximum(smooth[x], 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1 - alpha)
        factors[x] = np.clip(s, 1e-3, 1e3).astype(np.float32)
    return factors


def _shifted(x: str, producers: dict, factors: dict) -> bool:
    """True when the rows of ``x`` get zero point :data:`SHIFTED_ZP`: a GELU's output, not smoothed."""
    producer = producers.get(x)
    return producer is not None and producer.op_type in GELU_OPS and x not in factors


def _add_weights(graph, base: str, w: np.ndarray, factor: np.ndarray | None, levels: float) -> tuple[str, str]:
    """Append the int8 weights of ``w`` (smoothed by ``factor``) and their per-column scale over ``levels`` to
    ``graph``'s initializers; returns their names."""
    from onnx import numpy_helper

    w_q, scale = quantize_weight(w if factor is None else w * factor[:, None])
    names = f"{base}_rq_int8", f"{base}_rq_scale"
    graph.initializer.append(numpy_helper.from_array(w_q, names[0]))
    graph.initializer.append(numpy_helper.from_array((scale / levels).astype(np.float32), names[1]))
    return names


def _set_nodes(model, nodes: list, domain: str) -> None:
    """Make ``nodes`` the graph's nodes, drop initializers no node reads, and import ``domain``."""
    from onnx import helper

    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def quantize_rows(model, exclude=(), smooth: dict | None = None, alpha: float = 0.5) -> int:
    """Rewrite (in place) every MatMul of ``model`` whose second input is a 2-D float initializer of at
    least :data:`MIN_DIM` x :data:`MIN_DIM` into the per-row int8 form of the module docstring;
    returns how many were rewritten. A row quantization is shared by the MatMuls reading the same input.

    Args:
        exclude: MatMul node names kept in float32.
        smooth: input name -> (in_features,) largest absolute activation per channel (calibrated): those
            inputs are smoothed as SmoothQuant does, ``x / s`` and ``s * W`` with
            ``s = amax_x ** alpha / amax_w ** (1 - alpha)`` per input channel, so outlier channels do not
            set every row's scale alone (one extra element-wise Mul on the input).
        alpha: SmoothQuant's migration strength.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    smooth = smooth or {}
    consts = {
        "rq_127": np.array(127.0, np.float32), "rq_shifted_levels": np.array(SHIFTED_LEVELS, np.float32),
        "rq_tiny": np.array(1e-30, np.float32), "rq_one": np.array(1.0, np.float32),
        "rq_shifted_floor": np.array(SHIFTED_FLOOR, np.float32),
        "rq_zp": np.array(128, np.uint8), "rq_zp_shifted": np.array(SHIFTED_ZP, np.uint8),
        "rq_axes": np.array([-1], np.int64),
    }
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)

    def reduce(op: str, x: str, out: str):
        if opset >= 18:  # axes became an input in opset 18
            return helper.make_node(op, [x, "rq_axes"], [out], name=out, keepdims=1)
        return helper.make_node(op, [x], [out], name=out, axes=[-1], keepdims=1)

    for name, value in consts.items():
        if name not in inits:
            graph.initializer.append(numpy_helper.from_array(value, name))
    targets = [n for n in graph.node if _quantizable(n, inits, exclude)]
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in targets}
    factors = _smoothing_factors(targets, weights, smooth, alpha)  # input -> per-channel smoothing factor s
    target_names = {n.name for n in targets}
    rows: dict[str, tuple] = {}  # input -> (uint8 rows, per-row scale, zero point, levels)
    new_nodes = []
    for node in graph.node:
        if node.name not in target_names:
            new_nodes.append(node)
            continue
        x = node.input[0]
        base = node.name or node.output[0]
        if x not in rows:
            p = f"{x}_rq"
            src = x
            if x in factors:
                graph.initializer.append(numpy_helper.from_array((1.0 / factors[x]).astype(np.float32), f"{p}_smooth"))
                new_nodes.append(helper.make_node("Mul", [x, f"{p}_smooth"], [f"{p}_smoothed"], name=f"{p}_Smooth"))
                src = f"{p}_smoothed"
            if _shifted(x, producers, factors):  # nonnegative but for a small dip: the row maximum sets the scale
                new_nodes += [
                    reduce("ReduceMax", src, f"{p}_max"),
                    helper.make_node("Max", [f"{p}_max", "rq_shifted_floor"], [f"{p}_amax"], name=f"{p}_Max"),
                    helper.make_node("Div", ["rq_shifted_levels", f"{p}_amax"], [f"{p}_inv"], name=f"{p}_Div"),
                ]
                levels, zp = SHIFTED_LEVELS, "rq_zp_shifted"
            else:
                new_nodes += [
                    reduce("ReduceMax", src, f"{p}_max"),
                    reduce("ReduceMin", src, f"{p}_min"),
                    helper.make_node("Neg", [f"{p}_min"], [f"{p}_negmin"], name=f"{p}_Neg"),
                    helper.make_node("Max", [f"{p}_max", f"{p}_negmin", "rq_tiny"], [f"{p}_amax"], name=f"{p}_Max"),
                    helper.make_node("Div", ["rq_127", f"{p}_amax"], [f"{p}_inv"], name=f"{p}_Div"),
                ]
                levels, zp = 127.0, "rq_zp"
            new_nodes += [
                helper.make_node("Mul", [src, f"{p}_inv"], [f"{p}_scaled"], name=f"{p}_Scale"),
                helper.make_node("QuantizeLinear", [f"{p}_scaled", "rq_one", zp], [f"{p}_u8"], name=f"{p}_Quantize"),
            ]
            rows[x] = (f"{p}_u8", f"{p}_amax", zp, levels)
        x_q, amax, zp, levels = rows[x]
        wq_name, ws_name = _add_weights(graph, base, weights[node.name], factors.get(x), levels)
        new_nodes += [
            helper.make_node("MatMulIntegerToFloat", [x_q, wq_name, "rq_one", ws_name, zp],
                             [f"{base}_rq_out"], name=f"{base}_rq_MatMul", domain="com.microsoft"),
            helper.make_node("Mul", [f"{base}_rq_out", amax], list(node.output), name=f"{base}_rq_RowScale"),
        ]
    _set_nodes(model, new_nodes, "com.microsoft")
    return len(targets)


def _thirds(split, n_out: int, inits) -> bool:
    """True when the Split node ``split`` cuts the last axis of an (..., n_out) tensor into 3 equal parts that
    RowQuantMatMul can write itself (each a multiple of its 32-column tiles)."""
    from onnx import helper, numpy_helper

    if split.domain not in ("", "ai.onnx") or len(split.output) != 3 or n_out % 96:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    if attrs.get("axis", 0) not in (-1, 2):  # (B, S, 3 x hidden) in the graphs split_attention writes
        return False
    sizes = attrs.get("split")
    if len(split.input) > 1 and split.input[1]:
        if split.input[1] not in inits:
            return False
        sizes = numpy_helper.to_array(inits[split.input[1]]).tolist()
    return sizes is None or list(sizes) == [n_out // 3] * 3


def quantize_rows_fused(model, exclude=(), smooth: dict | None = None, alpha: float = 0.5) -> dict:
    """The per-row int8 rewrite of :func:`quantize_rows` with each MatMul as one ``ai.embfast::RowQuantMatMul``
    (:mod:`embfast.ortops`), which also takes in what follows the MatMul where it can (in place):

    - ``Add(MatMul, bias)`` with a 1-D float initializer: the bias;
    - then ``Add(that, residual)`` when the sum is its only use and the residual a LayerNorm's output (the
      token stream of a post-LN encoder, shaped as the product): the residual;
    - ``BiasGelu(MatMul, bias)`` (and ``Gelu``): the bias and GELU (erf form, to 1.5e-7);
    - ``Split(MatMul)`` into 3 equal parts (the QKV projection :func:`split_attention` writes): the operator
      writes Q, K and V itself, and takes in MultiHeadAttention's bias.

    Same quantization as :func:`quantize_rows` (smoothing factors, per-row scales, zero point 16 for GELU
    outputs), so the same accuracy; the smoothing multiplier goes into the operator too. Returns counts of
    what was rewritten and fused.
    """
    from onnx import helper, numpy_helper

    from embfast.ortops import DOMAIN

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    smooth = smooth or {}
    targets = [n for n in graph.node if _quantizable(n, inits, exclude)]
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in targets}
    factors = _smoothing_factors(targets, weights, smooth, alpha)

    def only_use(name: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    def vector(name: str, n: int) -> bool:
        t = inits.get(name)
        return t is not None and list(t.dims) == [n] and t.data_type == 1

    removed: set[int] = set()
    replace: dict[int, object] = {}
    counts = {"matmuls_quantized": 0, "bias_fused": 0, "residual_fused": 0, "gelu_fused": 0, "split_fused": 0}
    for node in targets:
        x = node.input[0]
        base = node.name or node.output[0]
        n_out = weights[node.name].shape[1]
        names = {"bias": "", "smooth": "", "residual": ""}
        if x in factors:
            names["smooth"] = f"{base}_rq_smooth"
            graph.initializer.append(numpy_helper.from_array((1.0 / factors[x]).astype(np.float32), names["smooth"]))
        shifted = _shifted(x, producers, factors)
        levels, zp, floor = (SHIFTED_LEVELS, SHIFTED_ZP, SHIFTED_FLOOR) if shifted else (127.0, 128, 1e-30)
        wq_name, ws_name = _add_weights(graph, base, weights[node.name], factors.get(x), levels)
        out, activation, last = node.output[0], 0, node
        nxt = only_use(out)
        if nxt is not None and nxt.op_type == "Add" and nxt.domain in ("", "ai.onnx"):
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            if vector(other, n_out):
                names["bias"], out, last = other, nxt.output[0], nxt
                removed.add(id(nxt))
                counts["bias_fused"] += 1
                res = only_use(out)
                other = None if res is None else res.input[1] if res.input[0] == out else res.input[0]
                # a LayerNorm's output: the token stream, shaped as this product (the operator adds no broadcast)
                if (res is not None and res.op_type == "Add" and res.domain in ("", "ai.onnx")
                        and getattr(producers.get(other), "op_type", "") in LAYER_NORM_OPS):
                    names["residual"] = other
                    out, last = res.output[0], res
                    removed.add(id(res))
                    counts["residual_fused"] += 1
        elif nxt is not None and nxt.op_type in ("BiasGelu", "Gelu") and nxt.domain == "com.microsoft" and (
                nxt.op_type == "Gelu" or vector(nxt.input[1], n_out)):
            if nxt.op_type == "BiasGelu":
                names["bias"] = nxt.input[1]
            out, activation, last = nxt.output[0], 1, nxt
            removed.add(id(nxt))
            counts["gelu_fused"] += 1
        outs = [out]
        # Q, K and V written straight from the products, with MultiHeadAttention's bias
        if nxt is not None and nxt.op_type == "Split" and _thirds(nxt, n_out, inits):
            outs, last = list(nxt.output), nxt
            removed.add(id(nxt))
            users = {id(u): u for o in outs for u in consumers.get(o, [])}
            mha = next(iter(users.values())) if len(users) == 1 else None
            if (mha is not None and mha.op_type == "MultiHeadAttention" and list(mha.input[:3]) == outs
                    and len(mha.input) > 3 and vector(mha.input[3], n_out)):
                names["bias"] = mha.input[3]
                mha.input[3] = ""
                counts["bias_fused"] += 1
            counts["split_fused"] += 1
        ins = [x, wq_name, ws_name, names["bias"], names["smooth"], names["residual"]]
        while not ins[-1]:
            ins.pop()
        # at the place of the last node it takes in: every input (a residual too) is computed by then
        removed.add(id(node))
        removed.discard(id(last))
        replace[id(last)] = helper.make_node(
            "RowQuantMatMul", ins, outs, name=f"{base}_rq", domain=DOMAIN, zero_point=zp, levels=levels,
            floor=floor, shifted=int(shifted), activation=activation, split=len(outs))
        counts["matmuls_quantized"] += 1
    _set_nodes(model, [replace.get(id(n), n) for n in graph.node if id(n) not in removed], DOMAIN)
    return counts


def calibrate(model, feeds_list, inputs=None) -> dict:
    """Largest absolute value per channel of the MatMul inputs ``inputs`` (default: every quantizable
    MatMul's input) over the real tokens of the batches ``feeds_list`` (dicts of ONNX inputs with an
    ``attention_mask``), running ``model`` (a float graph, not changed) on the CPU."""
    import copy

    import onnxruntime as ort
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    if inputs is None:
        inputs = sorted({n.input[0] for n in model.graph.node if _quantizable(n, inits, ())})
    probe = copy.deepcopy(model)
    have = {o.name for o in probe.graph.output}
    for name in inputs:
        if name not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    amax: dict[str, np.ndarray] = {}
    for feeds in feeds_list:
        outs = sess.run(list(inputs), {n: feeds[n] for n in names})
        mask = feeds.get("attention_mask")
        for name, a in zip(inputs, outs, strict=True):
            if a.ndim == 3 and mask is not None and a.shape[:2] == mask.shape:
                a = a[mask.astype(bool)]
            a = np.abs(a.reshape(-1, a.shape[-1])).max(axis=0)
            amax[name] = a if name not in amax else np.maximum(amax[name], a)
    return amax


# Texts whose activations calibrate the smoothing factors: varied lengths, registers, languages and scripts.
# Smoothing moves outlier channels' range into the weights; the row scales stay dynamic, so a text unlike
# these loses accuracy, never correctness, and its vector still depends on nothing but itself.
CALIBRATION_TEXTS = [
    "The cat sat on the mat.", "A man is playing a guitar on a stage in front of a large crowd.",
    "How do I reset my password?", "what is the capital of australia", "ok", "Thanks!", "yes", "?",
    "Stock markets fell sharply after the central bank raised interest rates for the third time this year.",
    "Proteins fold into three-dimensional structures that are determined by their amino-acid sequence, "
    "and misfolding is associated with several neurodegenerative diseases.",
    "The patient was given 5 mg of the drug twice a day for two weeks; no adverse events were reported.",
    "Children are playing soccer in the park while their parents watch from the benches.",
    "def add(a, b):\n    return a + b  # adds two numbers", "SELECT name, count(*) FROM users GROUP BY name;",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "Le chat dort sur le canapé depuis ce matin.",
    "El gobierno anunció nuevas medidas económicas para el próximo año.", "東京は日本の首都です。",
    "Привет, как дела?", "مرحبا بالعالم", "🙂🙂 great news everyone!!!", "1 2 3 4 5 6 7 8 9 10 11 12",
    "https://example.com/path?query=1&other=2", "ERROR 404: page not found", "lol that was sooo funny",
    "Vaccines train the immune system to recognise a pathogen without causing the disease itself.",
    "In 1969, Apollo 11 landed on the Moon, and Neil Armstrong became the first person to walk on its surface.",
    "Machine learning models can overfit when the training data is small relative to the number of parameters.",
    "Heat the oven to 180 degrees, mix the flour with the butter, then add the eggs one at a time.",
    "The court ruled that the contract was void because one party had not been informed of the risks.",
    "Mitochondria produce most of the chemical energy needed to power the cell's biochemical reactions, "
    "stored in adenosine triphosphate (ATP). Mitochondrial DNA is inherited maternally, and mutations in it "
    "have been linked to a range of metabolic disorders. Recent studies suggest that mitochondrial dynamics, "
    "including fission and fusion, play a role in ageing and in the response to cellular stress.",
    "BACKGROUND: Randomised trials have shown that lowering blood pressure reduces the risk of stroke. "
    "METHODS: We analysed data from 12,000 participants followed for a median of 4.5 years. RESULTS: The "
    "hazard ratio was 0.78 (95% CI 0.66-0.91). CONCLUSIONS: Intensive treatment reduced events without "
    "increasing serious adverse effects.",
]


def calibration_feeds(tokenizer, pairs: bool = False, batch: int = 8) -> list[dict]:
    """ONNX input batches of :data:`CALIBRATION_TEXTS` (for a cross-encoder, ``pairs``: each text with the
    next), tokenized and padded by ``tokenizer`` (an :class:`embfast.tokenization.TextTokenizer`)."""
    texts = CALIBRATION_TEXTS
    inputs = [(q, texts[(i + 1) % len(texts)]) for i, q in enumerate(texts)] if pairs else list(texts)
    t = tokenizer.tokenize(inputs)
    order = np.argsort(t.lengths, kind="stable")
    return [tokenizer.pad(t.ids, order[i:i + batch], t.type_ids) for i in range(0, len(order), batch)]


def build_rowquant(src, dst, exclude=(), calibration=None, smooth: str = "ln", alpha: float = ALPHA,
                   fused: bool | None = None) -> dict:
    """The per-row int8 graph of the float graph ``src`` (a path), written to ``dst``; returns what it did.

    Args:
        exclude: names of MatMul nodes (after :func:`split_attention`) kept in float32.
        calibration: batches of ONNX inputs (dicts with ``attention_mask``) to measure activation ranges
            for smoothing; None: no smoothing.
        smooth: which inputs are smoothed: "ln" (those a LayerNormalization produces: the attention and
            feed-forward inputs of a transformer layer), "all" (every input but GELU's) or "none".
    """
    import onnx

    model = onnx.load(str(src))
    attention = split_attention(model)
    amax = {}
    if calibration and smooth != "none":
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        inits = {i.name: i for i in model.graph.initializer}
        inputs = sorted({n.input[0] for n in model.graph.node if _quantizable(n, inits, exclude)})
        keep = {"ln": lambda op: op in LAYER_NORM_OPS, "all": lambda op: op not in GELU_OPS}[smooth]
        inputs = [x for x in inputs if keep(producers.get(x, ""))]
        amax = calibrate(model, calibration, inputs) if inputs else {}
    if fused is None:
        fused = fused_available()
    if fused:
        counts = quantize_rows_fused(model, exclude, smooth=amax, alpha=alpha)
    else:
        counts = {"matmuls_quantized": quantize_rows(model, exclude, smooth=amax, alpha=alpha)}
    onnx.save(model, str(dst))
    return {"recipe": current_recipe(fused), "attention_split": attention, **counts,
            "smoothed_inputs": len(amax), "alpha": alpha if amax else None}
