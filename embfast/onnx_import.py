"""ONNX files made elsewhere: :func:`import_onnx` turns one (already quantized, odd output names) plus a
tokenizer into an exported folder the engine runs, cached by content and built once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from embfast.config import _SUPPORTED_POOLING, ModelConfig, ModelConfigError, read_model_config
from embfast.export import (
    EXPORT_FORMAT,
    MANIFEST,
    _atomic_write_text,
    cache_root,
    file_lock,
    is_exported,
    safe_name,
    source_checksum,
    staged_folder,
)

__all__ = ["import_onnx"]

# Tokenizer-side files copied next to an imported ONNX.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_CONFIG_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_FEEDABLE = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tokenizer_source(tokenizer: str | Path) -> tuple[Path, bool]:
    """(the folder holding tokenizer.json, whether that folder also describes the model)."""
    path = Path(tokenizer).expanduser()
    if path.is_file():
        if path.name != "tokenizer.json":
            raise ValueError(f"tokenizer must be a folder with tokenizer.json or a tokenizer.json file, got {path}")
        return path.parent, False
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer must be a folder with tokenizer.json or a tokenizer.json file; "
                                f"{path} has no tokenizer.json")
    return path, (path / "config.json").is_file()


def _import_config(tok_dir: Path, described: bool) -> ModelConfig:
    if described:
        return read_model_config(tok_dir)
    cfg = ModelConfig()
    tok_cfg = {}
    with contextlib.suppress(OSError, ValueError):
        tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.padding_side = tok_cfg.get("padding_side", "right") or "right"
    mml = tok_cfg.get("model_max_length")
    trunc = (json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8")).get("truncation") or {})
    cfg.max_seq_length = int(mml if isinstance(mml, int) and 0 < mml < 1e9 else trunc.get("max_length") or 512)
    return cfg


def _external_files(onnx_file: Path) -> list[str]:
    """Files holding the graph's external initializers (relative to the .onnx)."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    files = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in init.external_data if e.key == "location")
    return sorted(files)


def import_onnx(onnx_file: str | Path, *, tokenizer: str | Path, output_name: str | None = None,
                pooling: str | None = None, normalize: bool | None = None, max_seq_length: int | None = None,
                name: str | None = None) -> Path:
    """Make an exported folder from an ONNX file made elsewhere; cached, built once.

    Args:
        onnx_file: the .onnx (it must take input_ids and attention_mask, and may take
            token_type_ids and position_ids, and return token embeddings).
        tokenizer: a folder with tokenizer.json, or a tokenizer.json file. A folder that
            is a sentence-transformers / Hugging Face folder (config.json) also gives
            pooling, normalization, max_seq_length, prompts and Dense layers.
        output_name: the token-embedding output; default None: ``last_hidden_state`` /
            ``token_embeddings`` or else the first 3-D float output.
        pooling: override (mean | cls | max | lasttoken | mean_sqrt_len); default from the folder, else mean.
        normalize: override; default from the folder, else False.
        max_seq_length: override; default from the folder or the tokenizer, else 512.
        name: the folder's name in the cache; default from the file.

    Returns:
        The cached folder (``$EMBFAST_HOME/models/<name>-<key>-v<format>``), whose
        ``fp32`` precision runs the graph as shipped.

    Raises:
        FileNotFoundError: the file or the tokenizer is missing.
        ValueError: a setting is invalid, or the graph's inputs or outputs cannot be used.
    """
    # absolute, links kept: a hub snapshot links model.onnx to a blob named by its hash (and the external
    # data sits beside the link, not beside the blob)
    onnx_file = Path(os.path.abspath(Path(onnx_file).expanduser()))
    if not onnx_file.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_file}")
    if onnx_file.suffix != ".onnx":
        raise ValueError(f"onnx_file must be a .onnx file, got {onnx_file.name}")
    tok_dir, described = _tokenizer_source(tokenizer)
    overrides = {k: v for k, v in {"pooling": pooling, "normalize": normalize, "max_seq_length": max_seq_length,
                                   "output_name": output_name}.items() if v is not None}
    if pooling is not None and pooling not in _SUPPORTED_POOLING:
        raise ValueError(f"pooling must be one of {', '.join(_SUPPORTED_POOLING)}, got {pooling!r}")
    if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                       or max_seq_length < 1):
        raise ValueError(f"max_seq_length must be an int >= 1, got {max_seq_length!r}")
    tok_sum = source_checksum(tok_dir) if described else _file_digest(tok_dir / "tokenizer.json")
    key = hashlib.sha256(json.dumps([_file_digest(onnx_file), tok_sum, overrides, described],
                                    sort_keys=True).encode()).hexdigest()
    base = name or (onnx_file.stem if onnx_file.stem != "model" else onnx_file.parent.name)
    out = cache_root() / "models" / f"{safe_name(base)}-{key[:16]}-v{EXPORT_FORMAT}"
    if is_exported(out):
        return out
    for other in sorted((cache_root() / "models").glob(f"*-{key[:16]}-v{EXPORT_FORMAT}")):
        if is_exported(other):  # the same file, tokenizer and settings imported under another name
            return other
    with file_lock(out.with_name(out.name + ".lock")):
        if not is_exported(out):
            _build_import(onnx_file, tok_dir, described, overrides, out, base)
    return out


def _build_import(onnx_file: Path, tok_dir: Path, described: bool, overrides: dict, out: Path, name: str) -> None:
    from embfast.dense import export_dense
    from embfast.export import _onnx_io
    from embfast.variants import VARIANT_FORMAT, graph_precision

    cfg = _import_config(tok_dir, described)
    for key in ("pooling", "normalize", "max_seq_length"):
        if key in overrides:
            setattr(cfg, key, overrides[key])
    with staged_folder(out) as tmp:
        shutil.copy2(onnx_file, tmp / "model.onnx")
        for rel in _external_files(onnx_file):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(onnx_file.parent / rel, tmp / rel)
        for f in _TOKENIZER_FILES + (_CONFIG_FILES if described else ()):
            if (tok_dir / f).is_file():
                shutil.copy2(tok_dir / f, tmp / f)
        if cfg.dense:
            export_dense(tok_dir, cfg.dense, tmp)
        input_names, output = _onnx_io(tmp / "model.onnx", overrides.get("output_name"))
        missing = [n for n in ("input_ids", "attention_mask") if n not in input_names]
        unknown = [n for n in input_names if n not in _FEEDABLE]
        if missing or unknown:
            raise ValueError(f"{onnx_file}: inputs must be input_ids, attention_mask and optionally token_type_ids, "
                             f"position_ids; got {input_names}")
        width = _probe_width(tmp, cfg, input_names, output)
        if described and width != cfg.dim:
            raise ModelConfigError(f"{onnx_file} returns {width}-wide token embeddings but {tok_dir} describes a "
                                   f"model with {cfg.dim}: the tokenizer folder must be this model's")
        if not described:
            cfg.dim = cfg.output_dim = width
        manifest = {
            "format": EXPORT_FORMAT,
            "source_kind": "onnx",
            "source": str(onnx_file),
            "tokenizer_source": str(tok_dir),
            "source_checksum": _file_digest(onnx_file),
            "name": name,
            "config": cfg.to_dict(),
            "input_names": input_names,
            "output_name": output,
            "graph_precision": graph_precision(tmp / "model.onnx"),
            "variants": {"fp32": "model.onnx"},
        }
        manifest["variant_checks"] = {"fp32": {"imported": f"run as shipped ({manifest['graph_precision']} weights)",
                                               "format": VARIANT_FORMAT}}
        _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))


def _probe_width(folder: Path, cfg: ModelConfig, input_names: list[str], output: str) -> int:
    """Run the graph on two short texts; returns the token-embedding width (checks it runs and is 3-D)."""
    import onnxruntime as ort

    from embfast.tokenization import TextTokenizer

    tok = TextTokenizer(folder / "tokenizer.json", cfg.max_seq_length, input_names, padding_side=cfg.padding_side)
    t = tok.tokenize(["a probe sentence", "ok"])
    feeds = tok.pad(t.ids, np.arange(2))
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    value = sess.run([output], {n: feeds[n] for n in input_names})[0]
    if value.ndim != 3 or value.shape[:2] != feeds["input_ids"].shape:
        raise ValueError(f"output {output!r} must be token embeddings (batch, seq_len, hidden) = "
                         f"{feeds['input_ids'].shape + ('hidden',)}, got shape {value.shape}; pass output_name=")
    return int(value.shape[-1])
