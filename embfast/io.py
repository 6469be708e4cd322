"""Streaming readers and writers for batch jobs: text, JSON lines, CSV and Parquet in; npy, Parquet, JSON lines out.

Readers yield one :class:`Record` (location, id, text) at a time and never hold a
whole file. Bad input (an unreadable file, a missing field, an empty line,
invalid UTF-8, a malformed JSON line) becomes a :class:`BadInputError` naming the
file and line; the caller either stops on it or, with ``on_bad``, counts it and
goes on. Line numbers are 1-based; for CSV they are the line a record starts on
(the header is line 1); for Parquet they are row numbers (1-based).

Writers assemble the shards a job wrote (each a ``(rows, dim)`` float32 ``.npy`` and
a ``.rows.jsonl`` of row fields) into one output file, streaming shard by shard.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embfast.text import lone_surrogate, strip_line_end, surrogate_reason

INPUT_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                 ".parquet": "parquet"}
OUTPUT_FORMATS = {".npy": "npy", ".parquet": "parquet", ".jsonl": "jsonl"}
_INSTALL_JOBS = "reading or writing parquet needs pyarrow: pip install 'embfast[jobs]'"


class BadInputError(ValueError):
    """One bad input: a row (with its line) or a whole file (line None).

    Attributes:
        path: the file as the user named it.
        line: 1-based line (row for Parquet), or None when the whole file is bad.
        reason: what is wrong, e.g. "missing field 'text'".
    """

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass
class Record:
    """One input text.

    Attributes:
        source: where it came from, "path:line".
        id: the ``--id-field`` value as a str, or ``source`` when no id field is named.
        text: the text (never empty).
    """

    source: str
    id: str
    text: str


@dataclass
class ReadOptions:
    """How to read inputs.

    Attributes:
        text_field: JSON / CSV / Parquet field holding the text (default "text"); unused for .txt.
        id_field: field holding the row id (None: the id is "path:line").
        input_format: txt | jsonl | csv | parquet; None infers it from each file's extension.
    """

    text_field: str = "text"
    id_field: str | None = None
    input_format: str | None = None


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(_INSTALL_JOBS) from exc
    return pa, pq


# ---- inputs -------------------------------------------------------------------------------------
def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Paths and glob patterns -> a list of paths, in the order given (each glob sorted).

    A name that exists is taken as it is (even with glob characters in it); a
    pattern that matches nothing raises FileNotFoundError naming it. A path that
    does not exist is kept, so the reader reports it as an unreadable file.
    """
    out: list[str] = []
    for p in patterns:
        if os.path.exists(p) or not glob.has_magic(p):
            out.append(p)
            continue
        matches = sorted(glob.glob(p, recursive=True))
        if not matches:
            raise FileNotFoundError(f"input pattern {p!r} matches no file")
        out.extend(matches)
    if not out:
        raise ValueError("inputs must name at least one file, got none")
    return out


def input_format(path: str, forced: str | None = None) -> str:
    """txt | jsonl | csv | parquet for ``path`` (``forced`` wins over the extension)."""
    if forced is not None:
        if forced not in set(INPUT_FORMATS.values()):
            raise ValueError(f"input format must be one of txt, jsonl, csv, parquet, got {forced!r}")
        return forced
    fmt = INPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: input must end in .txt, .jsonl, .csv or .parquet (or pass --input-format), "
                         f"got {Path(path).suffix or 'no extension'!r}")
    return fmt


def output_format(path: str | Path) -> str:
    """npy | parquet | jsonl from the output file's extension."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"output must end in .npy, .parquet or .jsonl, got {str(path)!r}")
    return fmt


def fingerprint(paths: Sequence[str]) -> list[dict]:
    """(absolute path, size, mtime) of each input, to refuse resuming over changed files."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        except OSError:
            out.append({"path": os.path.abspath(p), "size": None, "mtime_ns": None})
    return out


def count_rows(paths: Sequence[str], opts: ReadOptions) -> int | None:
    """A fast estimate of the rows in ``paths`` (for progress and ETA); None when unknown.

    Text and JSON lines: newlines; CSV: lines minus the header; Parquet: its metadata.
    """
    total = 0
    for p in paths:
        try:
            fmt = input_format(p, opts.input_format)
            if fmt == "parquet":
                _, pq = _pyarrow()
                total += pq.ParquetFile(p).metadata.num_rows
                continue
            n, last = 0, b"\n"
            with open(p, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    n += block.count(b"\n")
                    last = block[-1:]
            n += last != b"\n"
            total += max(n - 1, 0) if fmt == "csv" else n
        except (OSError, ValueError, ImportError):
            return None
        except Exception:  # noqa: BLE001 - a corrupt parquet footer: the reader reports it properly
            return None
    return total


def read_records(paths: Sequence[str], opts: ReadOptions | None = None,
                 on_bad: Callable[[BadInputError], None] | None = None) -> Iterator[Record]:
    """Yield the records of every input file in order, streaming.

    Args:
        paths: files (already expanded, see :func:`expand_inputs`).
        opts: fields and format; default: field "text", ids "path:line", format from the extension.
        on_bad: called with each :class:`BadInputError` (then the row, or the file, is skipped);
            None raises the first one.

    Raises:
        BadInputError: (a ValueError) on the first bad row or file when ``on_bad`` is None.
    """
    opts = opts or ReadOptions()
    for p in paths:
        fmt = input_format(p, opts.input_format)
        reader = {"txt": _read_txt, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[fmt]
        try:
            yield from reader(p, opts, on_bad)
        except BadInputError as exc:  # a whole-file problem (unreadable, bad header, not parquet)
            if on_bad is None:
                raise
            on_bad(exc)


def _bad(path: str, line: int, reason: str, on_bad) -> None:
    exc = BadInputError(path, line, reason)
    if on_bad is None:
        raise exc
    on_bad(exc)


def _open_error(path: str, exc: OSError) -> BadInputError:
    return BadInputError(path, None, f"cannot read file: {exc.strerror or exc}")


def _binary_lines(path: str) -> Iterator[tuple[int, bytes]]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, errors mapped to BadInputError
    except OSError as exc:
        raise _open_error(path, exc) from exc
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as exc:
                raise _open_error(path, exc) from exc
            if not raw:
                return
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield lineno, raw


def _decode(path: str, lineno: int, raw: bytes, on_bad) -> str | None:
    try:
        return strip_line_end(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        _bad(path, lineno, f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", on_bad)
        return None


def _text_lines(path: str, on_bad) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) for every non-empty, valid UTF-8 line; the others are reported."""
    for lineno, raw in _binary_lines(path):
        text = _decode(path, lineno, raw, on_bad)
        if text is None:
            continue
        if not text.strip():
            _bad(path, lineno, "empty line", on_bad)
            continue
        yield lineno, text


def _read_txt(path: str, opts: ReadOptions, on_bad) -> Iterator[Record]:
    for lineno, text in _text_lines(path, on_bad):
        src = f"{path}:{lineno}"
        yield Record(src, src, text)


def _field_text(path, lineno, row: dict, opts: ReadOptions, on_bad, columns) -> tuple[str, str] | None:
    """(id, text) from a mapping row, or None after reporting what is wrong."""
    name = opts.text_field
    if name not in row:
        _bad(path, lineno, f"missing field {name!r} (fields: {', '.join(map(str, columns)) or 'none'})", on_bad)
        return None
    text = row[name]
    if text is None:
        _bad(path, lineno, f"field {name!r} is null", on_bad)
        return None
    if not isinstance(text, str):
        _bad(path, lineno, f"field {name!r} must be a string, got {type(text).__name__}", on_bad)
        return None
    if not text.strip():
        _bad(path, lineno, f"field {name!r} is empty", on_bad)
        return None
    pos = lone_surrogate(text)
    if pos >= 0:  # JSON "\ud800" escapes decode to one; no tokenizer or UTF-8 writer takes it
        _bad(path, lineno, f"{surrogate_reason(text, pos)} in field {name!r}", on_bad)
        return None
    src = f"{path}:{lineno}"
    if opts.id_field is None:
        return src, text
    if opts.id_field not in row or row[opts.id_field] is None:
        _bad(path, lineno, f"missing field {opts.id_field!r} (the --id-field)", on_bad)
        return None
    rid = row[opts.id_field]
    if isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        _bad(path, lineno, f"field {opts.id_field!r} must be a string or an integer, got {type(rid).__name__}",
             on_bad)
        return None
    if isinstance(rid, str) and lone_surrogate(rid) >= 0:
        _bad(path, lineno, f"{surrogate_reason(rid, lone_surrogate(rid))} in field {opts.id_field!r}", on_bad)
        return None
    return str(rid), text


def _read_jsonl(path: str, opts: ReadOptions, on_bad) -> Iterator[Record]:
    for lineno, line in _text_lines(path, on_bad):
        try:
            row = json.loads(line)
        except ValueError as exc:
            _bad(path, lineno, f"invalid JSON: {getattr(exc, 'msg', exc)} (column {getattr(exc, 'colno', '?')})",
                 on_bad)
            continue
        if not isinstance(row, dict):
            _bad(path, lineno, f"expected a JSON object, got {type(row).__name__}", on_bad)
            continue
        got = _field_text(path, lineno, row, opts, on_bad, list(row))
        if got is not None:
            yield Record(f"{path}:{lineno}", got[0], got[1])


def _has_surrogate(values) -> int:
    """Index (1-based column) of the first value holding an undecodable byte, or 0."""
    for j, v in enumerate(values, 1):
        if any("\udc80" <= ch <= "\udcff" for ch in v):
            return j
    return 0


def _read_csv(path: str, opts: ReadOptions, on_bad) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents are normal input, not an error
    try:
        fh = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")  # noqa: SIM115
    except OSError as exc:
        raise _open_error(path, exc) from exc
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
        except (csv.Error, OSError) as exc:
            raise BadInputError(path, 1, f"unreadable CSV header: {exc}") from exc
        if header is None:
            return
        if _has_surrogate(header):
            raise BadInputError(path, 1, "invalid UTF-8 in the CSV header")
        for name in (opts.text_field, opts.id_field):
            if name is not None and name not in header:
                raise BadInputError(path, 1, f"missing field {name!r} in the CSV header (columns: {', '.join(header)})")
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                _bad(path, start, f"malformed CSV: {exc}", on_bad)
                start = reader.line_num + 1
                continue
            lineno, start = start, reader.line_num + 1
            if not values:
                _bad(path, lineno, "empty line", on_bad)
                continue
            col = _has_surrogate(values)
            if col:
                _bad(path, lineno, f"invalid UTF-8 in column {col} ({header[col - 1] if col <= len(header) else '?'})",
                     on_bad)
                continue
            row = dict(zip(header[: len(values)], values, strict=False))
            got = _field_text(path, lineno, row, opts, on_bad, header)
            if got is not None:
                yield Record(f"{path}:{lineno}", got[0], got[1])


class _BadUtf8:
    """A Parquet string value whose bytes are not UTF-8 (Arrow does not check what careless writers store)."""

    def __init__(self, raw: bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.reason = f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1})"


def _parquet_strings(pa, column) -> list:
    """A string column as Python values; a value that is not UTF-8 becomes a :class:`_BadUtf8`."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.to_pylist()
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # find the bad rows; the good ones are read as usual
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        out = []
        for raw in column.view(binary).to_pylist():
            try:
                out.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(_BadUtf8(raw))
        return out


def _read_parquet(path: str, opts: ReadOptions, on_bad) -> Iterator[Record]:
    pa, pq = _pyarrow()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise _open_error(path, exc) from exc
    with fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as exc:
            raise BadInputError(path, None, f"not a readable parquet file: {exc}") from exc
        names = pf.schema_arrow.names
        for name in (opts.text_field, opts.id_field):
            if name is not None and name not in names:
                raise BadInputError(path, None, f"missing field {name!r} (columns: {', '.join(names)})")
        ttype = pf.schema_arrow.field(opts.text_field).type
        if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype)):
            raise BadInputError(path, None, f"column {opts.text_field!r} must be strings, got {ttype}")
        cols = [opts.text_field] + ([opts.id_field] if opts.id_field else [])
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                texts = _parquet_strings(pa, batch.column(0))
                ids = _parquet_strings(pa, batch.column(1)) if opts.id_field else None
                for j, text in enumerate(texts):
                    row += 1
                    rec = {opts.text_field: text}
                    if ids is not None:
                        rec[opts.id_field] = ids[j]
                    bad = next((v for v in (text, ids[j] if ids is not None else None) if isinstance(v, _BadUtf8)),
                               None)
                    if bad is not None:
                        _bad(path, row, bad.reason, on_bad)
                        continue
                    got = _field_text(path, row, rec, opts, on_bad, cols)
                    if got is not None:
                        yield Record(f"{path}:{row}", got[0], got[1])
        except (pa.ArrowException, OSError) as exc:
            raise BadInputError(path, row + 1, f"unreadable parquet data: {exc}") from exc


# ---- shards and outputs ----------------------------------------------------------------------------
def write_shard(folder: Path, index: int, vectors: np.ndarray, rows: list[dict]) -> None:
    """Write shard ``index`` (vectors (n, dim) and one JSON line of fields per row) durably, then rename."""
    base = folder / f"shard-{index:06d}"
    for suffix, writer in ((".rows.jsonl", lambda fh: fh.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                                    for r in rows)),
                           (".npy", None)):
        tmp = base.with_name(base.name + suffix + ".tmp")
        if writer is None:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(vectors))
                fh.flush()
                os.fsync(fh.fileno())
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                writer(fh)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, base.with_name(base.name + suffix))


def read_shard(folder: Path, index: int, rows: int) -> tuple[np.ndarray, list[dict]]:
    """Shard ``index``: vectors (rows, dim) float32 and its row fields; checks both hold ``rows`` rows."""
    base = folder / f"shard-{index:06d}"
    vec = np.load(base.with_name(base.name + ".npy"))
    with open(base.with_name(base.name + ".rows.jsonl"), encoding="utf-8") as fh:
        fields = [json.loads(line) for line in fh]
    if vec.shape[0] != rows or len(fields) != rows:
        raise RuntimeError(f"{base}: shard holds {vec.shape[0]} vectors and {len(fields)} rows, the job state says "
                           f"{rows}; the work folder {folder} is damaged: delete it and run again")
    return vec, fields


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def assemble(folder: Path, shard_rows: list[int], dim: int, output: Path, fmt: str, *,
             schema_metadata: dict | None = None) -> int:
    """Concatenate the shards in ``folder`` into ``output`` atomically (temp file + rename); returns rows.

    ``npy``: one (rows, dim) float32 array, rows in input order. ``parquet``: the row
    fields (id, text, chunk fields, whatever the shards hold) plus ``vector``
    (fixed-size list of float32), one row group per shard. ``jsonl``: the row fields
    plus ``"vector"``, one object per line.
    """
    total = int(sum(shard_rows))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        if fmt == "npy":
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
            start = 0
            for i, n in enumerate(shard_rows):
                out[start:start + n] = np.load(folder / f"shard-{i:06d}.npy")
                start += n
            out.flush()
            del out
        elif fmt == "parquet":
            _assemble_parquet(folder, shard_rows, dim, tmp, schema_metadata or {})
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for i, n in enumerate(shard_rows):
                    vec, fields = read_shard(folder, i, n)
                    for f, v in zip(fields, vec.tolist(), strict=True):
                        f["vector"] = v
                        fh.write(json.dumps(f, ensure_ascii=False) + "\n")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, output)
        fsync_dir(output.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return total


def _assemble_parquet(folder: Path, shard_rows: list[int], dim: int, tmp: Path, meta: dict) -> None:
    pa, pq = _pyarrow()
    writer = None
    schema = None
    try:
        for i, n in enumerate(shard_rows):
            vec, fields = read_shard(folder, i, n)
            if schema is None:
                names = list(fields[0]) if fields else ["id"]
                types = {"id": pa.string(), "doc_id": pa.string(), "text": pa.string(), "source": pa.string(),
                         "chunk_index": pa.int32(), "char_start": pa.int64(), "char_end": pa.int64()}
                schema = pa.schema([pa.field(k, types.get(k, pa.string())) for k in names]
                                   + [pa.field("vector", pa.list_(pa.float32(), dim))],
                                   metadata={k: json.dumps(v) for k, v in meta.items()})
                writer = pq.ParquetWriter(tmp, schema)
            cols = [pa.array([f.get(k) for f in fields], type=schema.field(k).type) for k in schema.names[:-1]]
            flat = pa.array(np.ascontiguousarray(vec, dtype=np.float32).reshape(-1), type=pa.float32())
            cols.append(pa.FixedSizeListArray.from_arrays(flat, dim))
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
        if writer is None:  # no rows at all: an empty file with the plain schema
            schema = pa.schema([pa.field("id", pa.string()), pa.field("vector", pa.list_(pa.float32(), dim))],
                               metadata={k: json.dumps(v) for k, v in meta.items()})
            writer = pq.ParquetWriter(tmp, schema)
    finally:
        if writer is not None:
            writer.close()


def load_vectors(path: str | Path, *, field_name: str = "vector") -> np.ndarray:
    """Vectors written by ``embfast encode``: (rows, dim) float32 from .npy, .parquet or .jsonl."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == "npy":
        return np.load(path)
    if fmt == "parquet":
        _, pq = _pyarrow()
        col = pq.read_table(path, columns=[field_name]).column(0).combine_chunks()
        dim = col.type.list_size if hasattr(col.type, "list_size") else None
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if dim is None:
            dim = flat.size // max(len(col), 1)
        return flat.astype(np.float32).reshape(len(col), dim)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                rows.append(json.loads(line)[field_name])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a {field_name!r} list ({exc})") from exc
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
