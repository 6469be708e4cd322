"""Batch jobs: ``embfast encode`` over large files (streaming, resumable), chunking.

An encode job reads its inputs as a stream (:mod:`embfast.io`), embeds them
``shard_size`` records at a time and writes each shard durably into a work folder
``<output>.parts/`` next to the output, recording it in ``state.json`` only once
its files are complete. Memory holds one shard, never the whole input. When every
record is done the shards are concatenated into the output through a temporary
file and a rename (the output is either absent or complete), and the work folder
is removed. An interrupted job (Ctrl-C, SIGTERM, a kill, a crash) keeps its work
folder; the same command with ``--resume`` skips the records of the recorded
shards (re-reading, not re-embedding them) and carries on, so the result equals
an uninterrupted run row for row.

``embfast index build`` / ``index add`` run the same way (:mod:`embfast.index_build`, command line in
:mod:`embfast.indexcmd`: the same work folder, state, lock and ``--resume``; shards of index columns,
assembled into the index file).

Python API: :func:`encode_files`, :class:`Chunker`, :func:`embed_texts`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embfast import io as jio
from embfast.chunking import Chunker
from embfast.io import BadInputError, ReadOptions, Record

STATE_FORMAT = 1
DEFAULT_SHARD_SIZE = 4096
MAX_BAD_SHOWN = 10


# ---- embedding with progress ---------------------------------------------------------------------------
ROLES = (None, "query", "document")


def embed_texts(embedder, texts: list[str], *, batch_size: int = 32, normalize: bool | None = None,
                dimensions: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
                role: str | None = None, on_batch: Callable[[int, int], None] | None = None,
                step: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed one shard through the public ``Embedder.encode`` with a progress callback.

    The shard is length-sorted once as a whole (as ``encode`` does for one call), then
    encoded ``step`` texts at a time (default ``16 * batch_size``) so that progress moves
    while it runs; results come back in input order.

    Args:
        texts: the texts of one shard.
        prompt / prompt_name: as ``Embedder.encode`` (neither: the model's default prompt).
        role: None (``encode``), "query" (``encode_query``) or "document" (``encode_document``):
            the model's query / document prompt when no prompt is given.
        on_batch: called with (texts, tokens) after each step.

    Returns:
        vectors (n, dim) float32 in input order, token counts (n,) int64 (prompt included),
        truncated flags (n,) bool.
    """
    if role not in ROLES:
        raise ValueError(f"role must be None, 'query' or 'document', got {role!r}")
    encode = {None: embedder.encode, "query": embedder.encode_query, "document": embedder.encode_document}[role]
    n = len(texts)
    step = step or max(16 * batch_size, 256)
    order = np.argsort(-embedder.count_tokens(texts), kind="stable") if n else np.zeros(0, np.int64)
    out = np.empty((n, dimensions or embedder.dim), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    for s in range(0, n, step):
        rows = order[s:s + step]
        emb, info = encode([texts[i] for i in rows], batch_size=batch_size, normalize_embeddings=normalize,
                           truncate_dim=dimensions, prompt=prompt, prompt_name=prompt_name, return_info=True)
        out[rows] = emb
        lengths[rows] = info.token_counts
        truncated[rows] = info.truncated
        if on_batch is not None:
            on_batch(len(rows), int(info.token_counts.sum()))
    return out, lengths, truncated


class Progress:
    """Records done of an estimated total, texts/s, tokens/s and ETA.

    On a terminal: a tqdm bar. Otherwise: one plain line on stderr every ``interval``
    seconds. ``quiet``: nothing.
    """

    def __init__(self, total: int | None, *, quiet: bool = False, interval: float = 10.0, initial: int = 0,
                 unit: str = "records"):
        self.total, self.quiet, self.interval, self.unit = total, quiet, interval, unit
        self.done = float(initial)
        self.initial = initial
        self.texts = self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit[:-1] if unit.endswith("s") else unit,
                            desc="encode", dynamic_ncols=True, file=sys.stderr)

    def rates(self) -> tuple[float, float]:
        secs = max(time.perf_counter() - self.t0, 1e-9)
        return self.texts / secs, self.tokens / secs

    def advance(self, records: float, texts: int, tokens: int) -> None:
        self.done += records
        self.texts += texts
        self.tokens += tokens
        if self.quiet:
            return
        xps, tps = self.rates()
        if self.bar is not None:
            self.bar.update(int(self.done) - self.bar.n)  # whole records: tqdm shows counts, not fractions
            self.bar.set_postfix_str(f"{xps:,.0f} texts/s, {tps:,.0f} tokens/s", refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            print(f"encode: {self.line()}", file=sys.stderr, flush=True)

    def sync(self, done: int) -> None:
        """Set the exact count of records done (the per-batch fractions may round)."""
        self.done = float(done)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def line(self) -> str:
        xps, tps = self.rates()
        done = int(self.done)
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            secs = max(time.perf_counter() - self.t0, 1e-9)
            speed = (self.done - self.initial) / secs
            eta = (self.total - self.done) / speed if speed > 0 else float("inf")
            eta_s = time.strftime("%H:%M:%S", time.gmtime(max(eta, 0))) if eta != float("inf") else "?"
            head = f"{done:,}/{self.total:,} {self.unit} ({pct:.1f}%)"
        else:
            head, eta_s = f"{done:,} {self.unit}", "?"
        return f"{head}, {xps:,.0f} texts/s, {tps:,.0f} tokens/s, ETA {eta_s}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- shards ------------------------------------------------------------------------------------------------
@dataclass
class Shard:
    """One embedded shard: its rows' fields, vectors (rows, dim), and what it consumed."""

    rows: list[dict]
    vectors: np.ndarray
    records: int
    tokens: int
    truncated: int
    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


@dataclass
class BadCounter:
    """Counts bad rows and files; shows the first few on stderr, raises when not skipping."""

    skip: bool = False
    quiet: bool = False
    rows: int = 0
    files: int = 0
    muted: bool = False

    def __call__(self, exc: BadInputError) -> None:
        if self.muted:  # re-reading records a resumed job already did: they were counted then
            return
        if not self.skip:
            raise exc
        if exc.line is None:
            self.files += 1
        else:
            self.rows += 1
        if not self.quiet and self.rows + self.files <= MAX_BAD_SHOWN:
            print(f"skipped {exc}", file=sys.stderr)
            if self.rows + self.files == MAX_BAD_SHOWN:
                print("(further bad inputs are counted, not shown)", file=sys.stderr)


def embedded_shards(records: Iterator[Record], embedder, *, shard_size: int = DEFAULT_SHARD_SIZE,
                    chunker: Chunker | None = None, include_text: bool = False, batch_size: int = 32,
                    normalize: bool | None = None, dimensions: int | None = None, progress: Progress | None = None,
                    **embed: str | None) -> Iterator[Shard]:
    """Group ``records`` into shards of ``shard_size`` records and embed each one.

    ``embed``: ``prompt``, ``prompt_name``, ``role`` for :func:`embed_texts`.

    Rows: ``{"id"}`` per record, or with a chunker one row per chunk ``{"id": "<doc id>#<k>",
    "doc_id", "chunk_index", "char_start", "char_end"}``; plus ``"text"`` with ``include_text``.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    buf: list[Record] = []
    done = int(progress.done) if progress is not None else 0
    for rec in itertools.chain(records, [None]):
        if rec is not None:
            buf.append(rec)
        if buf and (len(buf) == shard_size or rec is None):
            shard = _embed_shard(buf, embedder, chunker, include_text, batch_size, normalize, dimensions, progress,
                                 embed)
            done += len(buf)
            if progress is not None:
                progress.sync(done)
            yield shard
            buf = []


def _embed_shard(records, embedder, chunker, include_text, batch_size, normalize, dimensions, progress,
                 embed: dict) -> Shard:
    rows: list[dict] = []
    texts: list[str] = []
    sources: list[str] = []
    for rec in records:
        if chunker is None:
            rows.append({"id": rec.id})
            texts.append(rec.text)
            sources.append(rec.source)
            continue
        for k, (s, e) in enumerate(chunker.split(rec.text)):
            rows.append({"id": f"{rec.id}#{k}", "doc_id": rec.id, "chunk_index": k, "char_start": s, "char_end": e})
            texts.append(rec.text[s:e])
            sources.append(rec.source)
    if include_text:
        for r, t in zip(rows, texts, strict=True):
            r["text"] = t
    per_text = len(records) / max(len(texts), 1)

    def on_batch(n: int, tokens: int) -> None:
        if progress is not None:
            progress.advance(n * per_text, n, tokens)

    vec, lengths, truncated = embed_texts(embedder, texts, batch_size=batch_size, normalize=normalize,
                                          dimensions=dimensions, on_batch=on_batch, **embed)
    return Shard(rows, vec, len(records), int(lengths.sum()), int(truncated.sum()), texts, sources)


# ---- the encode job ------------------------------------------------------------------------------------------
@dataclass
class JobResult:
    """What an encode job did (over all its runs, when resumed)."""

    output: Path
    rows: int
    records: int
    dim: int
    bad_rows: int
    bad_files: int
    tokens: int
    truncated: int
    seconds: float
    resumed_shards: int
    new_records: int = 0
    new_tokens: int = 0


def work_folder(output: str | Path) -> Path:
    """``<output>.parts``: where a job keeps its shards and ``state.json`` until it finishes."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def _write_state(folder: Path, state: dict) -> None:
    tmp = folder / "state.json.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / "state.json")
    jio.fsync_dir(folder)


def _load_state(folder: Path, config: dict, inputs: list[dict]) -> dict:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{folder}/state.json is missing or damaged ({exc}); delete {folder} and run again") from exc
    if state.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{folder} was written by another embfast version; delete it and run again")
    old = state.get("config", {})
    diff = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
            if old.get(k) != config.get(k)]
    if diff:
        raise ValueError(f"--resume: this run's settings differ from the interrupted run's ({'; '.join(diff)}); "
                         f"rerun with the original settings, or delete {folder} to start over")
    if state.get("inputs") != inputs:
        raise ValueError(f"--resume: the inputs changed since the interrupted run (files, sizes or times differ); "
                         f"delete {folder} to start over")
    return state


def encode_files(inputs: list[str], output: str | Path, embedder, *, read: ReadOptions | None = None,
                 batch_size: int = 32, normalize: bool | None = None, dimensions: int | None = None,
                 chunk_tokens: int | None = None, chunk_overlap: int = 0, include_text: bool = False,
                 shard_size: int = DEFAULT_SHARD_SIZE, resume: bool = False, skip_bad: bool = False,
                 quiet: bool = True, progress_interval: float = 10.0, prompt: str | None = None,
                 prompt_name: str | None = None) -> JobResult:
    """Embed every record of ``inputs`` into ``output`` (.npy, .parquet or .jsonl), streaming and resumable.

    Args:
        inputs: file paths or glob patterns (.txt, .jsonl, .csv, .parquet).
        output: .npy (vectors (rows, dim) float32 only), .parquet or .jsonl (id, chunk fields, text, vector).
        embedder: an :class:`embfast.Embedder`.
        read: text / id fields and the input format.
        normalize: L2-normalize (None: as the model says). dimensions: Matryoshka cut (None: all).
        chunk_tokens / chunk_overlap: split each record into token windows, one row per chunk.
        include_text: keep each row's text in the output (not for .npy).
        shard_size: records per shard (the unit of progress saved; memory holds one shard).
        resume: continue the interrupted job in ``<output>.parts``; without it an existing work folder is an error.
        skip_bad: count and skip bad rows and unreadable files instead of stopping at the first.
        quiet: no progress output. progress_interval: seconds between plain progress lines off a terminal.
        prompt / prompt_name: as ``Embedder.encode`` (neither: the model's default prompt, if any).

    Returns:
        A :class:`JobResult`. Raises :class:`embfast.io.BadInputError` (a ValueError naming file and line)
        on bad input without ``skip_bad``; ``KeyboardInterrupt`` leaves the work folder for ``resume``.
    """
    t0 = time.perf_counter()
    output = Path(output)
    fmt = jio.output_format(output)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    read = read or ReadOptions()
    if fmt == "npy" and (include_text or chunk_tokens):
        what = "--include-text" if include_text else "--chunk-tokens"
        raise ValueError(f"{what} needs a .parquet or .jsonl output (a .npy holds vectors only), got {output}")
    chunker = Chunker(embedder, chunk_tokens, chunk_overlap) if chunk_tokens else None
    paths = jio.expand_inputs(inputs)
    for p in paths:  # fail on a misspelt format before any work
        jio.input_format(p, read.input_format)
    config = {"model": embedder.manifest.get("name"), "model_checksum": embedder.manifest.get("source_checksum"),
              "precision": embedder.precision, "max_seq_length": embedder.max_seq_length, "dim": embedder.dim,
              "normalize": normalize, "dimensions": dimensions, "chunk_tokens": chunk_tokens,
              "chunk_overlap": chunk_overlap if chunk_tokens else None, "text_field": read.text_field,
              "id_field": read.id_field, "input_format": read.input_format, "include_text": include_text,
              "output_format": fmt, "prompt": prompt, "prompt_name": prompt_name}
    folder = work_folder(output)
    state, lock = open_job(folder, output, config, jio.fingerprint(paths), resume)
    try:
        return _run_job(state, folder, paths, output, fmt, embedder, read, chunker, t0, batch_size=batch_size,
                        normalize=normalize, dimensions=dimensions, include_text=include_text, shard_size=shard_size,
                        skip_bad=skip_bad, quiet=quiet, progress_interval=progress_interval,
                        embed={"prompt": prompt, "prompt_name": prompt_name})
    finally:
        lock.close()


def open_job(folder: Path, output: Path, config: dict, inputs: list[dict], resume: bool, *,
             what: str = "embfast encode"):
    """Create (or, with ``resume``, reopen) a job's work folder and lock it; returns (state, lock).

    A fresh folder gets a state ``{"format", "config", "inputs", "dim": None, "shards": []}``. An existing
    folder without ``resume`` is a ValueError; with it, the recorded config and input fingerprints must
    equal ``config`` / ``inputs`` (ValueError naming what changed). Close ``lock`` when the job ends.
    Shared by ``embfast encode`` and the streaming index builds (:mod:`embfast.index_build`).
    """
    fresh = not folder.exists()
    if fresh:
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            fresh = False
    lock = _lock_job(folder, output, what)
    try:
        if fresh:
            state = {"format": STATE_FORMAT, "config": config, "inputs": inputs, "dim": None, "shards": []}
            _write_state(folder, state)
        elif not resume:
            raise ValueError(f"{folder} holds an interrupted run of this job; pass --resume to finish it, "
                             f"or delete the folder to start over")
        else:
            state = _load_state(folder, config, inputs)
    except BaseException:
        lock.close()
        raise
    return state, lock


def skip_records(records: Iterator[Record], skip: int, bad: BadCounter, folder: Path) -> None:
    """Consume the first ``skip`` records (done by the interrupted run) without counting bad rows again."""
    if not skip:
        return
    bad.muted = True
    for i, _ in enumerate(records, 1):
        if i == skip:
            break
    else:
        raise RuntimeError(f"--resume: the inputs hold fewer records than the {skip} already done; "
                           f"delete {folder} to start over")
    bad.muted = False


def _lock_job(folder: Path, output: Path, what: str = "embfast encode"):
    """Hold an exclusive lock on the job's work folder for this process's lifetime (released at exit or kill)."""
    import fcntl

    fh = open(folder / "lock", "a+")  # noqa: SIM115 - kept open while the job runs
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise RuntimeError(f"another {what} is writing {output} right now (its work folder {folder} is "
                           "locked); wait for it to finish") from None
    return fh


def _run_job(state: dict, folder: Path, paths: list[str], output: Path, fmt: str, embedder, read: ReadOptions,
             chunker: Chunker | None, t0: float, *, batch_size, normalize, dimensions, include_text, shard_size,
             skip_bad, quiet, progress_interval, embed: dict) -> JobResult:
    """The shard loop and the final assembly of :func:`encode_files` (the work folder is set up and locked)."""
    config = state["config"]
    done_shards = len(state["shards"])
    skip = sum(s["records"] for s in state["shards"])
    bad = BadCounter(skip=skip_bad, quiet=quiet)
    total = None if quiet else jio.count_rows(paths, read)
    records = jio.read_records(paths, read, bad)
    skip_records(records, skip, bad, folder)
    progress = Progress(total, quiet=quiet, interval=progress_interval, initial=skip)
    try:
        for shard in embedded_shards(records, embedder, shard_size=shard_size, chunker=chunker,
                                     include_text=include_text, batch_size=batch_size, normalize=normalize,
                                     dimensions=dimensions, progress=progress, **embed):
            index = len(state["shards"])
            jio.write_shard(folder, index, shard.vectors, shard.rows)
            state["dim"] = int(shard.vectors.shape[1])
            state["shards"].append({"rows": len(shard.rows), "records": shard.records, "tokens": shard.tokens,
                                    "truncated": shard.truncated, "bad_rows": bad.rows, "bad_files": bad.files})
            bad.rows = bad.files = 0
            _write_state(folder, state)
    except BadInputError:
        if not state["shards"]:  # nothing worth resuming: leave no work folder behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        progress.close()
    dim = state["dim"] or embedder.dim
    if bad.rows or bad.files:  # bad rows after the last shard: record them with an empty shard
        state["shards"].append({"rows": 0, "records": 0, "tokens": 0, "truncated": 0, "bad_rows": bad.rows,
                                "bad_files": bad.files})
        jio.write_shard(folder, len(state["shards"]) - 1, np.zeros((0, dim), np.float32), [])
        _write_state(folder, state)
    meta = {"embfast": {"model": config["model"], "model_checksum": config["model_checksum"], "dim": dim,
                        "precision": config["precision"]}}
    rows = jio.assemble(folder, [s["rows"] for s in state["shards"]], dim, output, fmt, schema_metadata=meta)
    shutil.rmtree(folder, ignore_errors=True)
    sh = state["shards"]
    return JobResult(output, rows, sum(s["records"] for s in sh), dim, sum(s["bad_rows"] for s in sh),
                     sum(s["bad_files"] for s in sh), sum(s["tokens"] for s in sh), sum(s["truncated"] for s in sh),
                     time.perf_counter() - t0, done_shards, sum(s["records"] for s in sh) - skip,
                     sum(s["tokens"] for s in sh[done_shards:]))


# ---- CLI ------------------------------------------------------------------------------------------------------
def _env(name: str, default=None):
    return os.environ.get(f"EMBFAST_{name}", default)


def _input_args(p, *, optional: bool = False) -> None:
    p.add_argument("inputs", nargs="*" if optional else "+", metavar="INPUT",
                   help="files or glob patterns: .txt (one text per line), .jsonl, .csv, .parquet"
                   + (" (optional with --vectors: then they give the rows' ids and texts)" if optional else ""))
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.csv/.parquet (default text)")
    p.add_argument("--id-field", default=None, help="field holding the row id (default: file:line)")
    p.add_argument("--input-format", choices=["txt", "jsonl", "csv", "parquet"], default=None,
                   help="read every input as this format (default: from each file's extension)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count bad rows and unreadable files instead of stopping at the first")
    p.add_argument("--chunk-tokens", type=int, default=None, help="split texts into chunks of at most N tokens")
    p.add_argument("--chunk-overlap", type=int, default=0, help="tokens shared by consecutive chunks (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per ONNX Runtime call (default 32)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"records per shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between progress lines when stderr is not a terminal (default 10)")


def _model_args(p, *, precision_flag: str = "--precision") -> None:
    p.add_argument("--model", default=_env("MODEL"), help="model folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--device", default=_env("DEVICE", "cpu"), choices=["cpu", "cuda", "auto"])
    p.add_argument(precision_flag, dest="model_precision", default=_env("PRECISION", "fp32"),
                   choices=["fp32", "int8", "fp16", "auto"], help="model precision (default fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads (default: $EMBFAST_THREADS, else the cores this process may use)")
    p.add_argument("--max-seq-length", type=int, default=None, help="truncate inputs at N tokens (default: model's)")


def _embedder(args, model=None):
    from embfast import Embedder

    return Embedder(model if model is not None else args.model, device=args.device, precision=args.model_precision,
                    threads=args.threads, max_seq_length=args.max_seq_length)


def _read_opts(args) -> ReadOptions:
    return ReadOptions(text_field=args.text_field, id_field=args.id_field, input_format=args.input_format)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the job stops and keeps what it finished."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def cmd_encode(args) -> int:
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        m = _embedder(args)
        res = encode_files(args.inputs, args.output, m, read=_read_opts(args), batch_size=args.batch_size,
                           normalize=args.normalize, dimensions=args.dimensions, chunk_tokens=args.chunk_tokens,
                           chunk_overlap=args.chunk_overlap, include_text=args.include_text,
                           shard_size=args.shard_size, resume=args.resume, skip_bad=args.skip_bad, quiet=args.quiet,
                           progress_interval=args.progress_interval, prompt=args.prompt, prompt_name=args.prompt_name)
    except KeyboardInterrupt:
        folder = work_folder(args.output)
        if folder.exists():
            print(f"embfast encode: interrupted; finished shards are kept in {folder}: run the same command with "
                  f"--resume to finish", file=sys.stderr)
        else:
            print("embfast encode: interrupted", file=sys.stderr)
        return 130
    except BadInputError as exc:
        hint = "" if args.skip_bad else "; pass --skip-bad to skip and count bad rows"
        print(f"embfast encode: error: {exc}{hint}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old)
    rate = res.new_records / res.seconds if res.seconds > 0 else 0.0
    extra = []
    if res.resumed_shards:
        extra.append(f"resumed after {res.resumed_shards} shards")
    if res.bad_rows or res.bad_files:
        extra.append(f"skipped {res.bad_rows} bad rows and {res.bad_files} unreadable files")
    extra.append(f"{res.truncated} truncated at {m.max_seq_length} tokens")
    print(f"wrote {res.rows} rows x {res.dim} from {res.records} records to {res.output} in {res.seconds:.1f} s "
          f"({rate:,.1f} records/s, {res.new_tokens / max(res.seconds, 1e-9):,.0f} tokens/s); " + "; ".join(extra))
    return 0


def _bad_note(bad: BadCounter) -> str:
    return f"; skipped {bad.rows} bad rows and {bad.files} unreadable files" if (bad.rows or bad.files) else ""


def register_cli(sub) -> None:
    """Add ``encode`` to the ``embfast`` command (``index`` and ``search``: :mod:`embfast.indexcmd`)."""
    s = sub.add_parser("encode", help="embed text files into .npy / .parquet / .jsonl (streaming, resumable)")
    _input_args(s)
    _model_args(s)
    s.add_argument("-o", "--output", required=True, help="output file: .npy, .parquet or .jsonl")
    s.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize (default: as the model says)")
    s.add_argument("--dimensions", type=int, default=None, help="keep the first N dimensions (Matryoshka)")
    s.add_argument("--include-text", action="store_true", help="store each row's text (.parquet/.jsonl)")
    s.add_argument("--prompt", default=None, help="text prepended to every input (default: the model's default prompt)")
    s.add_argument("--prompt-name", default=None, help="one of the model's named prompts, e.g. query or document")
    s.add_argument("--resume", action="store_true", help="finish an interrupted run from its <output>.parts folder")
    s.set_defaults(func=cmd_encode)
