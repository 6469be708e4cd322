"""Models by name from the Hugging Face Hub: ``Embedder("org/name")``, ``CrossEncoder("org/name")``.

One resolver for every model kind (:func:`resolve_hub`): the repo is fetched with
``huggingface_hub.snapshot_download`` into the Hugging Face cache (``cache_dir=``,
else ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), only
the files a model needs (:func:`allow_patterns`: the weights in one format,
tokenizer, configs, sentence-transformers module folders such as ``1_Pooling/``,
or with ``onnx_file=`` that ONNX file instead of the weights), and then runs as a
local folder does: exported once into ``$EMBFAST_HOME`` (keyed by content, so a
snapshot and a local copy of the same files share one export), or, with
``onnx_file="onnx/model.onnx"``, imported as shipped, without torch.

``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` never touches the network; a repo
missing then raises :class:`HubModelNotFoundError` naming the repo, the cache folder
and how to fetch it (``embfast pull`` / ``huggingface-cli download``). ``token=`` (or
``HF_TOKEN``) reaches private and gated repos. Environment variables are read at each
call, not when huggingface_hub is imported.

``embfast pull org/name`` downloads and exports ahead of time (for air-gapped
machines); ``embfast models`` lists the hub cache too (:func:`hub_models`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = ("1", "ON", "YES", "TRUE")

# Files every kind may read (configs and every tokenizer format), and sentence-transformers module folders.
CONFIG_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
                "tokenizer.model")
MODULE_FOLDERS = "[0-9]*_*/*"  # 1_Pooling/config.json, 2_Dense/model.safetensors, 2_Normalize/...
# Weight formats in order of preference: the first the repo has is fetched, the others are not.
WEIGHT_FORMATS = (("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"))
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class HubModelNotFoundError(FileNotFoundError):
    """A repo (or revision) that is not in the Hugging Face cache and cannot be downloaded."""


class HubModelFilesError(FileNotFoundError):
    """A repo snapshot without a file the model needs (weights, config.json, tokenizer.json, the ONNX file)."""


@dataclass
class HubSnapshot:
    """One revision of a repo in the Hugging Face cache.

    Attributes:
        repo_id: ``org/name``.
        revision: what was asked (a branch, tag or commit; default ``main``).
        path: ``<cache>/models--org--name/snapshots/<commit>``.
        cache_dir: the hub cache folder.
        files: the files present in the snapshot (relative, ``/``-separated), broken links left out.
        downloaded: True when the Hub was asked (online), False for a cache-only look-up.
        repo_files: the repo's file list from the Hub (online only; empty offline).
    """

    repo_id: str
    revision: str
    path: Path
    cache_dir: Path
    files: list[str] = field(default_factory=list)
    downloaded: bool = False
    repo_files: list[str] = field(default_factory=list)

    @property
    def commit(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def is_repo_id(model) -> bool:
    """True for a string shaped like a Hub repo id (``org/name``): one slash, no path syntax."""
    return isinstance(model, str) and bool(_REPO_ID.match(model)) and ".." not in model


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face cache: ``cache_dir``, else ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's
    default (``~/.cache/huggingface/hub``); the environment is read now, not at import."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_mode(local_files_only: bool | None = None) -> bool:
    """True when the Hub must not be asked: ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` (read now)."""
    if local_files_only:
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def repo_folder(repo_id: str, cache_dir: Path) -> Path:
    """``<cache>/models--org--name`` (huggingface_hub's layout)."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def allow_patterns(repo_id: str, repo_files: list[str] | None, onnx_file: str | None = None) -> list[str]:
    """The ``allow_patterns`` that fetch only what a model needs.

    Configs and tokenizer files (:data:`CONFIG_FILES`), sentence-transformers module folders
    (``1_Pooling/``, ``2_Dense/``, ...), and either ``onnx_file`` (with its external data,
    ``onnx/model.onnx_data``) or the weights in one format: safetensors when the repo has
    them, else ``pytorch_model.bin`` (sharded or not). Never the other formats a repo
    ships (TF, Flax, Rust, OpenVINO, other ONNX files).

    Args:
        repo_id: for error messages.
        repo_files: the repo's files (``HfApi.model_info(...).siblings``); None when unknown.
        onnx_file: a shipped ONNX file to run instead of exporting the weights.

    Raises:
        HubModelFilesError: the repo has no weights (naming the files looked for, and its ONNX files if any),
            or no ``onnx_file``.
    """
    patterns = list(CONFIG_FILES) + [MODULE_FOLDERS]
    if onnx_file:
        if repo_files is not None and onnx_file not in repo_files:
            onnx = [f for f in repo_files if f.endswith(".onnx")]
            raise HubModelFilesError(f"{repo_id} has no {onnx_file}; its ONNX files: {onnx or 'none'}")
        return patterns + [onnx_file, onnx_file + "_data", onnx_file + ".data"]
    if repo_files is None:
        return patterns + [p for fmt in WEIGHT_FORMATS for p in fmt]
    for fmt in WEIGHT_FORMATS:
        if any(fnmatch.fnmatch(f, p) for f in repo_files for p in fmt[:2]):
            return patterns + list(fmt)
    raise HubModelFilesError(no_weights_message(repo_id, repo_files))


def no_weights_message(where: str, files: list[str]) -> str:
    onnx = [f for f in files if f.endswith(".onnx")]
    hint = (f"; it ships ONNX, which runs without export: onnx_file={onnx[0]!r} (files: {', '.join(onnx)})"
            if onnx else "")
    return (f"{where} has no weights: looked for model.safetensors (or model-0000x-of-0000y.safetensors) and "
            f"pytorch_model.bin (or shards){hint}")


def _snapshot_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _missing_message(repo_id: str, revision: str, cache: Path, reason: str) -> str:
    folder = repo_folder(repo_id, cache)
    have = ""
    if folder.is_dir():
        refs = sorted(p.relative_to(folder / "refs").as_posix() for p in (folder / "refs").rglob("*") if p.is_file()) \
            if (folder / "refs").is_dir() else []
        snaps = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
        have = f" (the cache has {folder.name} with refs {refs or 'none'} and snapshots {snaps or 'none'})"
    rev = "" if revision == "main" else f" --revision {revision}"
    return (f"model {repo_id!r} at revision {revision!r} is not in the Hugging Face cache {cache}{have}, and "
            f"{reason}. Fetch it where the Hub can be reached: `embfast pull {repo_id}{rev}` or "
            f"`huggingface-cli download {repo_id}{rev}`, then copy {folder} into {cache} (or point "
            "HF_HUB_CACHE / cache_dir= at the cache that has it)")


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
             local_files_only: bool | None = None, token: str | bool | None = None,
             onnx_file: str | None = None) -> HubSnapshot:
    """Fetch (or find in the cache) the files of ``repo_id`` a model needs.

    Args:
        repo_id: ``org/name``.
        revision: a branch, tag or commit hash; default None (``main``).
        cache_dir: the Hugging Face cache; default :func:`hub_cache_dir`.
        local_files_only: never ask the Hub; default None (``HF_HUB_OFFLINE``).
        token: for private or gated repos; default None (``HF_TOKEN`` or the saved login).
        onnx_file: fetch this ONNX file instead of the weights (:func:`allow_patterns`).

    Returns:
        The snapshot. Offline, files are not checked here (:func:`check_snapshot` does).

    Raises:
        HubModelNotFoundError: offline and not cached; no such repo or revision on the Hub (or no access);
            the Hub unreachable and not cached. HubModelFilesError: no weights, or no ``onnx_file``.
    """
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with tokenizers
        raise ImportError("loading a model by Hub id needs huggingface_hub: pip install huggingface_hub") from exc
    rev = revision or "main"
    cache = hub_cache_dir(cache_dir)
    repo_files: list[str] = []
    reason = ("downloads are off (local_files_only=True)" if local_files_only
              else "downloads are off (HF_HUB_OFFLINE=1)")
    if not offline_mode(local_files_only):
        try:
            info = HfApi(token=token).model_info(repo_id, revision=rev, token=token)
        except RevisionNotFoundError:
            raise HubModelNotFoundError(f"model {repo_id!r} has no revision {rev!r} on the Hub") from None
        except RepositoryNotFoundError as exc:  # also gated repos without access
            raise HubModelNotFoundError(f"model {repo_id!r} is not on the Hub, or is private or gated and this "
                                        f"token has no access (pass token= or set HF_TOKEN): {exc}") from None
        except Exception as exc:  # no network, Hub down: use the cache if it has the revision
            reason = f"the Hub could not be reached ({type(exc).__name__}: {exc})"
        else:
            repo_files = [s.rfilename for s in info.siblings or []]
            patterns = allow_patterns(repo_id, repo_files or None, onnx_file)
            path = Path(snapshot_download(repo_id, revision=rev, cache_dir=cache, token=token,
                                          allow_patterns=patterns))
            return HubSnapshot(repo_id, rev, path, cache, _snapshot_files(path), True, repo_files)
    try:
        path = Path(snapshot_download(repo_id, revision=rev, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise HubModelNotFoundError(_missing_message(repo_id, rev, cache, reason)) from None
    return HubSnapshot(repo_id, rev, path, cache, _snapshot_files(path), False, repo_files)


def check_snapshot(snap: HubSnapshot) -> None:
    """Check that a snapshot has what an export needs: config.json, tokenizer.json and every weight file.

    A download cut short leaves huggingface_hub's ``.incomplete`` blob and no link in the
    snapshot, so it shows here as a missing file (a shard listed in the index and absent too).

    Raises:
        HubModelFilesError: naming the missing file and the snapshot folder.
    """
    where = f"{snap.label} ({snap.path})"
    files = set(snap.files)
    for needed in ("config.json", "tokenizer.json"):
        if needed not in files:
            raise HubModelFilesError(f"{where} has no {needed}; embfast needs it to run the model")
    for index in _INDEXES:
        if index in files:
            try:
                shards = sorted(set(json.loads((snap.path / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise HubModelFilesError(f"{where}: {index} is unreadable ({exc})") from None
            missing = [s for s in shards if s not in files]
            if missing:
                raise HubModelFilesError(f"{where}: {index} lists {missing}, not in the snapshot (an interrupted "
                                         "download? fetch it again)")
            return
    if not any(fnmatch.fnmatch(f, p) for f in files for fmt in WEIGHT_FORMATS for p in fmt[:2]):
        raise HubModelFilesError(no_weights_message(where, sorted(files | set(snap.repo_files))))


def export_snapshot(snap: HubSnapshot, *, kind: str = "embedder", onnx_file: str | None = None,
                    tokenizer: str | Path | None = None, output_name: str | None = None) -> Path:
    """The exported embfast folder of a snapshot: its weights exported once, or ``onnx_file`` imported as shipped.

    Args:
        snap: from :func:`download`.
        kind: ``"embedder"``, ``"cross-encoder"`` or ``"sparse-encoder"`` (``onnx_file`` is for embedders).
        onnx_file: a path inside the repo (``onnx/model.onnx``): run it with the base install (no torch);
            its token-embedding output is detected (or ``output_name``); pooling and the rest come from the
            repo's sentence-transformers config.
        tokenizer, output_name: with ``onnx_file``: as :func:`embfast.onnx_import.import_onnx` (default: the repo).

    Raises:
        HubModelFilesError: a file is missing. ValueError: an option that does not apply.
        ImportError: exporting needs the ``export`` extra (the message names the repo's ONNX files).
    """
    from embfast.export import ensure_exported
    from embfast.onnx_import import import_onnx

    if onnx_file:
        if kind != "embedder":
            raise ValueError(f"onnx_file= runs a shipped ONNX embedding model; a {kind} is exported from its weights")
        path = snap.path / onnx_file
        if not path.is_file():
            onnx = [f for f in snap.files if f.endswith(".onnx")]
            raise HubModelFilesError(f"{snap.label} ({snap.path}) has no {onnx_file}; ONNX files there: "
                                     f"{onnx or 'none'}")
        return import_onnx(path, tokenizer=tokenizer or snap.path, output_name=output_name, name=snap.repo_id)
    if tokenizer is not None or output_name is not None:
        raise ValueError("tokenizer= and output_name= apply with onnx_file=, not to a repo's weights")
    check_snapshot(snap)
    try:
        # a SPLADE repo may be a plain *ForMaskedLM folder, which only the asking class can tell from a masked LM
        return ensure_exported(snap.path, "sparse-encoder" if kind == "sparse-encoder" else None, name=snap.repo_id)
    except ImportError as exc:
        onnx = sorted(f for f in set(snap.files) | set(snap.repo_files) if f.endswith(".onnx"))
        hint = (f"; or run an ONNX file the repo ships, without torch: onnx_file={onnx[0]!r}" if onnx else
                "; or, if the repo ships an ONNX file, run it without torch with onnx_file='onnx/model.onnx'")
        raise ImportError(f"{snap.label}: {exc}{hint}") from exc


def resolve_hub(repo_id: str, *, kind: str = "embedder", revision: str | None = None,
                cache_dir: str | Path | None = None, local_files_only: bool | None = None,
                token: str | bool | None = None, onnx_file: str | None = None, tokenizer: str | Path | None = None,
                output_name: str | None = None) -> Path:
    """A ready-to-run exported folder for a Hub repo id: :func:`download` then :func:`export_snapshot`.

    What :func:`embfast.models.resolve` calls for ``Embedder("org/name")`` and ``CrossEncoder("org/name")``, and
    :func:`embfast.sparse_encoder.resolve_sparse` for ``SparseEncoder("org/name")``;
    every argument is documented there. Nothing is written to ``$EMBFAST_HOME`` unless the whole
    snapshot is there and the export succeeds (exports are staged and renamed into place).
    """
    snap = download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                    token=token, onnx_file=onnx_file)
    return export_snapshot(snap, kind=kind, onnx_file=onnx_file, tokenizer=tokenizer, output_name=output_name)


# ---- the hub cache in `embfast models` -----------------------------------------------------
def hub_models(cache_dir: str | Path | None = None) -> list[dict]:
    """One row per model snapshot in the Hugging Face cache (those with a config.json or an ONNX file).

    Keys: name (``org/name``, ``@ref`` or ``@commit`` for a snapshot that ``main`` does not point to),
    kind, dim, pooling, normalize, dense, max_seq_length (None when unknown), source (``hub <snapshot>``),
    snapshot, and error (when the config cannot be read).
    """
    from embfast.config import model_kind, read_cross_encoder_config, read_model_config

    try:
        cache = hub_cache_dir(cache_dir)
    except ImportError:  # pragma: no cover
        return []
    rows = []
    for folder in sorted(cache.glob("models--*--*")):
        repo_id = folder.name[len("models--"):].replace("--", "/", 1)
        refs = {}
        for ref in (folder / "refs").rglob("*") if (folder / "refs").is_dir() else ():
            if ref.is_file():
                refs.setdefault(ref.read_text().strip(), []).append(ref.relative_to(folder / "refs").as_posix())
        for snap in sorted((folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else ():
            if not (snap / "config.json").is_file() and not any(snap.rglob("*.onnx")):
                continue
            names = refs.get(snap.name, [])
            tag = "" if "main" in names else "@" + (names[0] if names else snap.name[:12])
            row = {"name": repo_id + tag, "kind": "embedder", "source": f"hub {snap}", "snapshot": str(snap)}
            try:
                row["kind"] = model_kind(snap)
                if row["kind"] == "cross-encoder":
                    ce = read_cross_encoder_config(snap)
                    row.update({"dim": None, "normalize": False, "dense": 0, "max_seq_length": ce.max_seq_length,
                                "pooling": f"cross-encoder({ce.num_labels} label{'s' if ce.num_labels != 1 else ''})"})
                else:
                    cfg = read_model_config(snap)
                    row.update({"dim": cfg.output_dim, "pooling": cfg.pooling, "normalize": cfg.normalize,
                                "dense": len(cfg.dense), "max_seq_length": cfg.max_seq_length})
            except (OSError, ValueError) as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows


# ---- `embfast pull` --------------------------------------------------------------------------
def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def cmd_pull(args) -> int:
    """``embfast pull org/name``: download, export and build precisions ahead of time; print what and where."""
    from embfast.config import model_kind
    from embfast.variants import ensure_variant

    snap = download(args.repo_id, revision=args.revision, cache_dir=args.cache_dir,
                    local_files_only=args.local_files_only or None, token=args.token, onnx_file=args.onnx_file)
    total = sum(_size(snap.path / f) for f in snap.files)
    how = "downloaded (or already cached)" if snap.downloaded else "found in the cache (offline)"
    print(f"{snap.label}: {how}, commit {snap.commit}, {len(snap.files)} files, {total / 1e6:.1f} MB")
    print(f"  snapshot: {snap.path}")
    for f in snap.files:
        print(f"    {f}  ({_size(snap.path / f) / 1e6:.2f} MB)")
    kind = model_kind(snap.path) if (snap.path / "config.json").is_file() else "embedder"
    out = export_snapshot(snap, kind=kind, onnx_file=args.onnx_file)
    for precision in args.precision or ["fp32"]:
        ensure_variant(out, precision)
    print(f"  {kind} export: {out} ({', '.join(args.precision or ['fp32'])})")
    return 0


def register_cli(subparsers) -> None:
    """Add ``embfast pull`` to the CLI."""
    s = subparsers.add_parser("pull", help="download a model from the Hugging Face Hub and export it ahead of time "
                                           "(for air-gapped machines)")
    s.add_argument("repo_id", help="org/name")
    s.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    s.add_argument("--precision", nargs="+", choices=["fp32", "int8", "fp16"], default=None,
                   help="precisions to build (default: fp32)")
    s.add_argument("--onnx-file", default=None, help="run this ONNX file of the repo instead of exporting its "
                                                     "weights (e.g. onnx/model.onnx; needs no torch)")
    s.add_argument("--cache-dir", default=None, help="Hugging Face cache (default: HF_HUB_CACHE, HF_HOME/hub, "
                                                     "~/.cache/huggingface/hub)")
    s.add_argument("--token", default=None, help="for private or gated repos (default: HF_TOKEN)")
    s.add_argument("--local-files-only", action="store_true", help="use the cache only (as HF_HUB_OFFLINE=1)")
    s.set_defaults(func=cmd_pull)
