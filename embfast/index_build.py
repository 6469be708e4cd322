"""Streaming index builds: ``embfast index build`` / ``index add`` over inputs larger than memory.

The corpus is embedded (or read from precomputed vectors) ``shard_size`` records at a
time, exactly as :func:`embfast.jobs.encode_files` does: each shard is validated (as
:meth:`embfast.Index.add` validates rows: finite vectors, L2-normalized; ids, texts and
metadata encoded as the index stores them) and written durably into the work folder
``<output>.parts/`` (``shard-NNNNNN.npz``), then recorded in its ``state.json``. An
interrupted build keeps the folder; the same command with ``--resume`` carries on after
the recorded shards (the same machinery as ``embfast encode --resume``).

When every shard is written, the index file is assembled section by section with
:func:`embfast.index.write_index_file` (the writer :meth:`Index.save` uses, so the format
and the sha256 of every section are the same): each section is copied from the shards
(and, for ``index add``, from the existing file) one block at a time. int8 calibration
ranges are the per-dimension min / max over the vectors, gathered while the vectors
section is written; the codes are then computed in a second pass that reads the
finished vectors section back from the file in blocks. Memory holds one shard or one
block (64k rows) at a time plus 8 bytes per row for the duplicate check of str ids,
never the corpus. The file is written to a temporary name and renamed over the output;
the work folder is removed.

The result equals an in-memory build: ``Index(embedder, precision=p)`` with the same rows
added (in the same order, with the same ids, texts and metadata) and ``save``-d writes the
same bytes (only the manifest's ``created`` time differs).

Python API: :func:`build_index`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embfast import io as jio
from embfast import kernels
from embfast.chunking import Chunker
from embfast.index import _BLOCK_ROWS, Index, _model_info, read_index_manifest, write_index_file
from embfast.io import ReadOptions, Record
from embfast.jobs import (
    DEFAULT_SHARD_SIZE,
    BadCounter,
    Progress,
    Shard,
    _write_state,
    embedded_shards,
    open_job,
    skip_records,
    work_folder,
)


@dataclass
class IndexBuildResult:
    """What a streaming index build did (over all its runs, when resumed)."""

    output: Path
    rows: int          # rows in the index file
    added: int         # rows this job added (all of them for a build)
    dim: int
    precision: str
    bad_rows: int
    bad_files: int
    seconds: float
    resumed_shards: int


# ---- reading arrays in blocks (never a mapping: mapped pages would count as the process's memory) -----------------
def _read_rows(path: Path, offset: int, dtype, row_shape: tuple, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an array stored C-contiguously at byte ``offset`` of ``path``."""
    dtype = np.dtype(dtype)
    per_row = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    count = (stop - start) * int(np.prod(row_shape, dtype=np.int64))
    with open(path, "rb") as fh:
        out = np.fromfile(fh, dtype=dtype, count=count, offset=offset + start * per_row)
    if out.size != count:
        raise RuntimeError(f"{path}: expected {count} values at byte {offset + start * per_row}, got {out.size}")
    return out.reshape((stop - start, *row_shape))


_BLOCK_BYTES = 2 << 20


def _blocks(path: Path, offset: int, dtype, shape: tuple, start: int = 0, rows: int | None = None) -> Iterator:
    """Rows ``start:`` of a stored array, a block (about 2 MiB, at most 64k rows) at a time."""
    n = int(shape[0])
    if rows is None:
        row_bytes = max(int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize, 1)
        rows = max(1, min(_BLOCK_ROWS, _BLOCK_BYTES // row_bytes))
    for s in range(start, n, rows):
        yield _read_rows(path, offset, dtype, tuple(shape[1:]), s, min(s + rows, n))


def _npy_layout(path: Path) -> tuple[int, np.dtype, tuple]:
    """(data offset, dtype, shape) of a C-ordered .npy file (mapped only to read its header)."""
    m = np.load(path, mmap_mode="r")
    try:
        if m.ndim > 1 and not m.flags.c_contiguous:
            raise ValueError(f"{path}: a Fortran-ordered .npy is not supported; save it C-ordered")
        return int(m.offset), m.dtype, tuple(m.shape)
    finally:
        del m


def _id_hash(ids: list[str]) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little")
                        for i in ids), dtype=np.uint64, count=len(ids))


# ---- shards ---------------------------------------------------------------------------------------------------------
def _shard_path(folder: Path, i: int) -> Path:
    return folder / f"shard-{i:06d}.npz"


def _write_index_shard(folder: Path, i: int, dim: int, kind: str, shard: Shard, ids, texts, meta) -> int:
    """Validate one shard as Index.add does and write its columns durably; returns its rows."""
    part = Index(None, dim=dim)
    part.add(shard.vectors, ids=ids, metadata=meta, texts=texts)
    arrays = {"vectors": part._vectors.full() if len(part) else np.zeros((0, dim), np.float32)}
    if kind == "str":
        blob, offsets = part._str_ids.parts()
        arrays["ids_blob"], arrays["ids_offsets"] = np.concatenate([np.zeros(0, np.uint8), *blob]), offsets
        arrays["ids_hash"] = _id_hash(ids)
    else:
        arrays["ids"] = part._int_ids.full() if len(part) else np.zeros(0, np.int64)
    for name, col in (("texts", part._texts), ("meta", part._meta)):
        blob, offsets = col.parts()
        arrays[f"{name}_blob"], arrays[f"{name}_offsets"] = np.concatenate([np.zeros(0, np.uint8), *blob]), offsets
    path = _shard_path(folder, i)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(part)


def _shard_array(folder: Path, i: int, name: str) -> np.ndarray:
    with np.load(_shard_path(folder, i)) as z:
        return z[name]


def _vector_shards(vectors: Path, records: Iterator[Record] | None, start: int, shard_size: int,
                   progress: Progress) -> Iterator[Shard]:
    """Shards of precomputed vectors (rows from ``start``), with the texts / ids of ``records`` when given."""
    offset, dtype, shape = _npy_layout(vectors)
    n = shape[0]
    for s in range(start, n, shard_size):
        e = min(s + shard_size, n)
        vec = _read_rows(vectors, offset, dtype, tuple(shape[1:]), s, e)
        rows, texts, sources = [{"id": None}] * (e - s), [], []
        if records is not None:
            recs = [r for _, r in zip(range(e - s), records, strict=False)]
            if len(recs) != e - s:
                raise ValueError(f"--vectors {vectors} holds {n} rows but the inputs hold only {s + len(recs)} "
                                 "records; give the texts the vectors were made from")
            rows, texts, sources = [{"id": r.id} for r in recs], [r.text for r in recs], [r.source for r in recs]
        progress.advance(e - s, e - s, 0)
        yield Shard(rows, vec, e - s, 0, 0, texts, sources)
    if records is not None and next(records, None) is not None:
        raise ValueError(f"--vectors {vectors} holds {n} rows but the inputs hold more records; give the texts "
                         "the vectors were made from")


# ---- the job --------------------------------------------------------------------------------------------------------
def build_index(inputs: list[str], output: str | Path, embedder, *, precision: str = "fp32",
                base: str | Path | None = None, vectors: str | Path | None = None, read: ReadOptions | None = None,
                batch_size: int = 32, chunk_tokens: int | None = None, chunk_overlap: int = 0,
                with_ids: bool = False, store_text: bool = True, shard_size: int = DEFAULT_SHARD_SIZE,
                resume: bool = False, skip_bad: bool = False, quiet: bool = True,
                progress_interval: float = 10.0) -> IndexBuildResult:
    """Build (or extend) an index file from a corpus, streaming: memory holds one shard, not the corpus.

    Args:
        inputs: text files or glob patterns (.txt, .jsonl, .csv, .parquet), embedded with
            ``embedder.encode_document``; may be empty with ``vectors``.
        output: the index file to write (atomically: temporary file + rename).
        embedder: the :class:`embfast.Embedder` the index is tied to (its model is recorded).
        precision: "fp32", "int8" or "binary" (default "fp32"); ignored with ``base`` (the base's is kept).
        base: an existing index file to extend (``index add``): its rows come first, read from the file
            one block at a time; ``output`` may be the same path. Its model must be ``embedder``'s.
        vectors: a .npy (rows, dim) of precomputed vectors (e.g. ``embfast encode -o x.npy``) to index
            instead of embedding ``inputs``; with ``inputs`` too, their records give the rows' ids and
            texts (one record per vector row, same order, no chunking).
        read: text / id fields and input format. with_ids: use the records' ids (``read.id_field``)
            as the rows' str ids (default: int ids 0, 1, ... after the base's largest).
        chunk_tokens / chunk_overlap: one row per token window (str ids ``<record id>#<k>``).
        store_text: keep each row's text in the index (default True).
        shard_size: records per shard (default 4096): the unit of memory and of progress saved.
        resume: continue the interrupted job in ``<output>.parts``; without it an existing work folder
            is a ValueError.
        skip_bad / quiet / progress_interval: as :func:`embfast.jobs.encode_files`.

    Returns:
        An :class:`IndexBuildResult`.

    Raises:
        ValueError: bad options, ids that repeat (within the corpus or against the base's), a base with
        other ids' kind, dims that differ, or a run that differs from the interrupted one (``resume``);
        :class:`embfast.io.BadInputError` on bad input without ``skip_bad``; ``KeyboardInterrupt``
        leaves the work folder for ``resume``; :class:`embfast.index.ModelMismatchError` for a base
        built with another model.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    read = read or ReadOptions()
    paths = jio.expand_inputs(inputs) if inputs else []
    for p in paths:
        jio.input_format(p, read.input_format)
    if vectors is None and not paths:
        raise ValueError("give input files to embed, or --vectors with precomputed vectors")
    dim = int(embedder.dim)
    if vectors is not None:
        vectors = Path(vectors)
        if chunk_tokens:
            raise ValueError("--chunk-tokens needs texts to embed; it cannot be used with --vectors")
        _, vdtype, vshape = _npy_layout(vectors)
        if len(vshape) != 2 or vshape[1] != dim or vdtype.kind not in "fiu":
            raise ValueError(f"--vectors must be a numeric .npy (rows, {dim}) for this model, got {vdtype} "
                             f"{vshape}")
    kind = "str" if (chunk_tokens or with_ids) else "int"
    base_man = None
    if base is not None:
        from embfast.index import check_model

        base = Path(base)
        base_man = read_index_manifest(base)
        check_model(base_man, embedder, base)
        if "sparse" in base_man:
            raise ValueError(f"{base} keeps sparse rows; add to it with the Python API (Index.load(..., "
                             "sparse_encoder=...).add)")
        precision = base_man["precision"]
        if base_man["count"] and base_man["id_kind"] != kind:
            if base_man["id_kind"] == "str":
                raise ValueError("ids must be given: this index has str ids, so new rows need theirs "
                                 "(--id-field or --chunk-tokens)")
            raise ValueError("ids must be ints like the index's existing ids, got strs (drop --id-field)")
    if precision not in ("fp32", "int8", "binary"):
        raise ValueError(f"precision must be one of fp32, int8, binary, got {precision!r}")
    config = {"job": "index", "model": embedder.manifest.get("name"),
              "model_checksum": embedder.manifest.get("source_checksum"), "model_precision": embedder.precision,
              "max_seq_length": embedder.max_seq_length, "dim": dim, "precision": precision,
              "chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap if chunk_tokens else None,
              "text_field": read.text_field, "id_field": read.id_field, "input_format": read.input_format,
              "with_ids": bool(with_ids), "store_text": bool(store_text),
              "vectors": None if vectors is None else str(vectors), "base": None if base is None else str(base)}
    prints = jio.fingerprint([*paths, *([str(vectors)] if vectors is not None else []),
                              *([str(base)] if base is not None else [])])
    folder = work_folder(output)
    state, lock = open_job(folder, output, config, prints, resume, what="embfast index build")
    try:
        return _run(state, folder, paths, output, embedder, read, kind, base, base_man, vectors, t0,
                    batch_size=batch_size, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                    store_text=store_text, shard_size=shard_size, skip_bad=skip_bad, quiet=quiet,
                    progress_interval=progress_interval)
    finally:
        lock.close()


def _run(state, folder, paths, output, embedder, read, kind, base, base_man, vectors, t0, *, batch_size,
         chunk_tokens, chunk_overlap, store_text, shard_size, skip_bad, quiet, progress_interval):
    done_shards = len(state["shards"])
    skip = sum(s["records"] for s in state["shards"])
    dim = int(embedder.dim)
    id_start = 0
    if base is not None and base_man["count"] and kind == "int":
        s = base_man["sections"]["ids"]
        id_start = max(int(b.max()) for b in _blocks(base, s["offset"], s["dtype"], s["shape"])) + 1
    id_next = id_start + sum(s["rows"] for s in state["shards"])
    bad = BadCounter(skip=skip_bad, quiet=quiet)
    total = None
    if not quiet:
        total = _npy_layout(vectors)[2][0] if vectors is not None else jio.count_rows(paths, read)
    records = jio.read_records(paths, read, bad) if paths else None
    if records is not None:
        skip_records(records, skip, bad, folder)
    progress = Progress(total, quiet=quiet, interval=progress_interval, initial=skip)
    chunker = Chunker(embedder, chunk_tokens, chunk_overlap) if chunk_tokens else None
    if vectors is not None:
        shards = _vector_shards(vectors, records, skip, shard_size, progress)
    else:
        shards = embedded_shards(records, embedder, shard_size=shard_size, chunker=chunker, batch_size=batch_size,
                                 progress=progress, role="document")
    try:
        for shard in shards:
            n = len(shard.rows)
            if kind == "str":
                ids = [r["id"] for r in shard.rows]
            else:
                ids = np.arange(id_next, id_next + n, dtype=np.int64)
            meta = [{"source": src, **{k: r[k] for k in ("doc_id", "chunk_index", "char_start", "char_end")
                                      if k in r}} for r, src in zip(shard.rows, shard.sources, strict=True)] \
                if shard.sources else None
            texts = shard.texts if (store_text and shard.texts) else None
            rows = _write_index_shard(folder, len(state["shards"]), dim, kind, shard, ids, texts, meta)
            id_next += rows
            state["dim"] = dim
            state["shards"].append({"rows": rows, "records": shard.records, "tokens": shard.tokens,
                                    "truncated": shard.truncated, "bad_rows": bad.rows, "bad_files": bad.files})
            bad.rows = bad.files = 0
            _write_state(folder, state)
    except jio.BadInputError:
        if not state["shards"]:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        progress.close()
    if bad.rows or bad.files:  # bad rows after the last shard: record them with an empty shard
        empty = Shard([], np.zeros((0, dim), np.float32), 0, 0, 0)
        no_ids = [] if kind == "str" else np.zeros(0, np.int64)
        _write_index_shard(folder, len(state["shards"]), dim, kind, empty, no_ids, None, None)
        state["shards"].append({"rows": 0, "records": 0, "tokens": 0, "truncated": 0, "bad_rows": bad.rows,
                                "bad_files": bad.files})
        _write_state(folder, state)
    sh = state["shards"]
    rows = assemble_index(folder, [s["rows"] for s in sh], output, kind=kind, dim=dim,
                          precision=state["config"]["precision"], model=_model_info(embedder), base=base,
                          base_manifest=base_man)
    shutil.rmtree(folder, ignore_errors=True)
    return IndexBuildResult(output, rows, sum(s["rows"] for s in sh), dim, state["config"]["precision"],
                            sum(s["bad_rows"] for s in sh), sum(s["bad_files"] for s in sh),
                            time.perf_counter() - t0, done_shards)


# ---- assembly -------------------------------------------------------------------------------------------------------
def _check_unique_str_ids(folder: Path, shard_rows: list[int], base: Path | None, base_man: dict | None) -> None:
    """ValueError naming an id that occurs twice (8-byte hashes sorted; a hash match is confirmed on the strings)."""
    parts = []
    if base is not None and base_man["count"]:
        parts.extend(_id_hash(ids) for ids in _base_strings(base, base_man, "ids"))
    parts.extend(_shard_array(folder, i, "ids_hash") for i in range(len(shard_rows)))
    if not parts:
        return
    allh = np.concatenate(parts)
    del parts
    allh.sort()
    dup = np.flatnonzero(allh[1:] == allh[:-1])
    if dup.size == 0:
        return
    suspects = set(allh[dup].tolist())
    del allh
    seen: dict = {}
    for ids in _all_str_ids(folder, shard_rows, base, base_man):
        for h, i in zip(_id_hash(ids).tolist(), ids, strict=True):
            if h in suspects:
                if i in seen.setdefault(h, set()):
                    raise ValueError(f"ids must be unique, got {i!r} twice; fix the inputs and delete {folder} "
                                     "to start over")
                seen[h].add(i)


def _strings_of(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [raw[offsets[k] - offsets[0]:offsets[k + 1] - offsets[0]].decode("utf-8") for k in range(len(offsets) - 1)]


def _base_strings(base: Path, man: dict, name: str, rows: int = 16384) -> Iterator[list[str]]:
    secs = man["sections"]
    b, o = secs[f"{name}.blob"], secs[f"{name}.offsets"]
    n = o["shape"][0] - 1
    for s in range(0, n, rows):
        offs = _read_rows(base, o["offset"], np.int64, (), s, min(s + rows, n) + 1)
        blob = _read_rows(base, b["offset"], np.uint8, (), int(offs[0]), int(offs[-1]))
        yield _strings_of(blob, offs)


def _all_str_ids(folder, shard_rows, base, base_man) -> Iterator[list[str]]:
    if base is not None and base_man["count"]:
        yield from _base_strings(base, base_man, "ids")
    for i in range(len(shard_rows)):
        with np.load(_shard_path(folder, i)) as z:
            yield _strings_of(z["ids_blob"], z["ids_offsets"])


def assemble_index(folder: Path, shard_rows: list[int], output: Path, *, kind: str, dim: int, precision: str,
                   model: dict, base: Path | None = None, base_manifest: dict | None = None) -> int:
    """Write the index file ``output`` from the shards in ``folder`` (after the rows of ``base``, if given).

    Sections are streamed one block / one shard at a time; the bytes equal :meth:`Index.save` of the same
    rows. Returns the number of rows in the file.
    """
    man = base_manifest
    base_n = int(man["count"]) if man is not None else 0
    secs = man["sections"] if man is not None else {}
    new_n = int(sum(shard_rows))
    n = base_n + new_n
    if man is not None:
        model = man["model"]
    if kind == "str" and new_n:
        _check_unique_str_ids(folder, shard_rows, base, man)
    id_kind = (man["id_kind"] if base_n else (kind if new_n else "int"))
    ranges = None
    ranges_n = 0
    if man is not None and "ranges" in secs:
        s = secs["ranges"]
        ranges = _read_rows(base, s["offset"], np.float32, (dim,), 0, 2)
        ranges_n = int(man.get("int8_ranges_count") or 0)
    recompute = precision == "int8" and n > 0 and (ranges is None or n > 2 * ranges_n)
    lo = np.full(dim, np.inf, np.float32)
    hi = np.full(dim, -np.inf, np.float32)

    def base_blocks(name: str):
        if base_n:
            s = secs[name]
            yield from _blocks(base, s["offset"], s["dtype"], tuple(s["shape"]))

    def shard_pieces(name: str):
        for i in range(len(shard_rows)):
            yield _shard_array(folder, i, name)

    def vector_pieces():
        nonlocal lo, hi
        for b in _chain(base_blocks("vectors"), shard_pieces("vectors")):
            if recompute and b.shape[0]:
                lo = np.minimum(lo, b.min(axis=0))
                hi = np.maximum(hi, b.max(axis=0))
            yield b

    def string_pieces(name: str, shard_name: str):
        blob_pieces = _chain(base_blocks(f"{name}.blob"), shard_pieces(f"{shard_name}_blob"))

        def offsets():
            last = 0
            if base_n:
                for b in base_blocks(f"{name}.offsets"):
                    yield b
                    last = int(b[-1])
            else:
                yield np.zeros(1, np.int64)
            for o in shard_pieces(f"{shard_name}_offsets"):
                yield o[1:] + last
                last += int(o[-1])

        return blob_pieces, offsets

    def fill(section) -> dict:
        nonlocal ranges, ranges_n
        section("vectors", vector_pieces(), np.float32, (n, dim))
        if precision != "fp32" and n:
            section.flush()
            vec_sec = (section.path, section.sections["vectors"]["offset"])
            if recompute:
                ranges, ranges_n = np.stack([lo, hi]), n
            keep = 0 if (recompute or "codes" not in secs) else base_n

            def codes():
                if keep:
                    yield from base_blocks("codes")
                for b in _blocks(vec_sec[0], vec_sec[1], np.float32, (n, dim), start=keep):
                    yield kernels.quantize(b, precision, ranges=ranges).codes

            code_shape = (n, dim) if precision == "int8" else (n, (dim + 7) // 8)
            section("codes", codes(), np.int8 if precision == "int8" else np.uint8, code_shape)
        if ranges is not None:
            section("ranges", [ranges], np.float32, (2, dim))
        if id_kind == "str":
            blob, offsets = string_pieces("ids", "ids")
            total = _string_total("ids", "ids")
            section("ids.blob", blob, np.uint8, (total,))
            section("ids.offsets", offsets(), np.int64, (n + 1,))
        else:
            section("ids", _chain(base_blocks("ids"), shard_pieces("ids")), np.int64, (n,))
        for name, shard_name in (("texts", "texts"), ("metadata", "meta")):
            blob, offsets = string_pieces(name, shard_name)
            section(f"{name}.blob", blob, np.uint8, (_string_total(name, shard_name),))
            section(f"{name}.offsets", offsets(), np.int64, (n + 1,))
        return {"model": model, "precision": precision, "dim": dim, "count": n, "id_kind": id_kind,
                "int8_ranges_count": ranges_n, "sparse": None}

    def _string_total(name: str, shard_name: str) -> int:
        total = int(secs[f"{name}.blob"]["nbytes"]) if base_n else 0
        for i in range(len(shard_rows)):
            total += int(_shard_array(folder, i, f"{shard_name}_offsets")[-1])
        return total

    write_index_file(output, fill)
    return n


def _chain(*iters):
    for it in iters:
        yield from it
