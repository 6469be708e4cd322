"""A persistent vector index: ``embfast.Index``, one file, memory-mapped, checksummed, tied to its model.

>>> index = embfast.Index(embfast.Embedder(), precision="int8")
>>> index.add(["The cat sat on the mat", "Stocks fell sharply"], metadata=[{"lang": "en"}, None])
>>> index.search("where did the cat sit?", top_k=1)   # [[{"id": 0, "score": 0.62, "text": ..., "metadata": ...}]]
>>> index.save("docs.embf");  index = embfast.Index.load("docs.embf", embedder=embfast.Embedder())

Vectors are stored L2-normalized (zero rows stay zero), so that cosine similarity is one
inner product. Search is exact cosine over fp32 vectors, or over int8 / packed-binary codes whose
``rescore_multiplier * k`` best candidates are re-ranked by the exact fp32 cosine
(the fp32 vectors stay on disk, memory-mapped, for that). int8 calibration ranges
are computed from the vectors in the index when codes are built, and rebuilt (with
all codes) whenever the index has more than doubled since; rows added in between
use the current ranges.

File layout (little-endian): ``EMBFIDX1`` | sections, each 64-byte aligned (vectors
(n, dim) float32; codes; int8 ranges; ids; texts and metadata as a UTF-8 blob plus
(n + 1) int64 offsets) | the JSON manifest | manifest length (uint64) | sha256 of
the manifest | ``EMBFIDX1``. The manifest names the model (name, source checksum,
dim) and holds every section's offset, shape, dtype and sha256. Saves write a
temporary file and rename it over the target, so a reader sees the old or the new
index, never a mix. Loading checks the end marker, the manifest checksum and the
file size (a truncated file is refused) and, with ``verify=True`` (default), every
section's sha256 (one sequential read of the file; ``verify=False`` skips it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import numpy as np

from embfast import kernels
from embfast.text import check_text, check_texts

MAGIC = b"EMBFIDX1"
INDEX_FORMAT = 1
PRECISIONS = ("fp32", "int8", "binary")
_TRAILER = struct.Struct("<Q32s8s")
_ALIGN = 64
_BLOCK_ROWS = 65536
_READ_BLOCK = 1 << 24


class IndexCorruptError(ValueError):
    """The index file is truncated, damaged or not an embfast index."""


class ModelMismatchError(ValueError):
    """The index was built with another model than the embedder given."""


def _check_sparse_model(want: dict | None, encoder, path) -> None:
    """Refuse a sparse encoder other than the one the index's sparse rows were built with."""
    from embfast.index_sparse import sparse_model_info

    got = sparse_model_info(encoder)
    if want is not None and (want.get("name"), want.get("source_checksum"), want.get("vocab_size")) != \
            (got["name"], got["source_checksum"], got["vocab_size"]):
        raise ModelMismatchError(f"{path}'s sparse rows were built with {want.get('name')!r} (checksum "
                                 f"{str(want.get('source_checksum'))[:12]}), but the sparse encoder is {got['name']!r} "
                                 f"(checksum {str(got['source_checksum'])[:12]}); use {want.get('source')}")


# ---- columns: a base (maybe memory-mapped) plus rows appended since -----------------------------------
class _Rows:
    """Rows of a 2-D (or 1-D) array: a base array (maybe a read-only memmap) plus appended arrays."""

    def __init__(self, base: np.ndarray):
        self.base = base
        self.extra: list[np.ndarray] = []
        self.n = int(base.shape[0])

    def __len__(self) -> int:
        return self.n

    def append(self, rows: np.ndarray) -> None:
        self.extra.append(rows)
        self.n += int(rows.shape[0])

    def full(self) -> np.ndarray:
        """All rows as one array (copies a memmap base into memory once there are appended rows)."""
        if self.extra:
            self.base = np.concatenate([np.asarray(self.base), *self.extra])
            self.extra = []
        return self.base

    def blocks(self):
        """The rows in order, in blocks of at most _BLOCK_ROWS (no full copy)."""
        for part in (self.base, *self.extra):
            for s in range(0, part.shape[0], _BLOCK_ROWS):
                yield part[s:s + _BLOCK_ROWS]


class _Strings:
    """Optional strings (None stored as empty): a UTF-8 blob + (n + 1) int64 offsets, plus appended values."""

    def __init__(self, blob: np.ndarray | None = None, offsets: np.ndarray | None = None):
        self.blob = np.zeros(0, np.uint8) if blob is None else blob
        self.offsets = np.zeros(1, np.int64) if offsets is None else offsets
        self.extra: list[bytes] = []

    def __len__(self) -> int:
        return len(self.offsets) - 1 + len(self.extra)

    def get(self, i: int) -> str | None:
        nb = len(self.offsets) - 1
        raw = bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]) if i < nb else self.extra[i - nb]
        return raw.decode("utf-8") if raw else None

    def append(self, values) -> None:
        self.extra.extend(b"" if v is None else v.encode("utf-8") for v in values)

    def extend_empty(self, n: int) -> None:
        self.extra.extend([b""] * n)

    def parts(self) -> tuple[list, np.ndarray]:
        """(blob pieces, offsets (n + 1,) int64) for writing."""
        lens = np.fromiter((len(b) for b in self.extra), dtype=np.int64, count=len(self.extra))
        offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lens)]) if self.extra else self.offsets
        return [self.blob, *[np.frombuffer(b, np.uint8) for b in self.extra if b]], offsets.astype(np.int64)


# ---- the index ------------------------------------------------------------------------------------------
def _model_info(embedder) -> dict:
    man = embedder.manifest
    return {"name": man.get("name"), "source_checksum": man.get("source_checksum"), "source": man.get("source"),
            "dim": int(embedder.dim), "truncate_dim": embedder.truncate_dim,
            "max_seq_length": int(embedder.max_seq_length)}


class Index:
    """Vectors with ids, optional texts and metadata, searched by cosine similarity.

    Args:
        embedder: the :class:`embfast.Embedder` that turns texts (added or searched) into vectors; its
            model (name and source checksum) is recorded, and loading with another model is refused.
            None: a vectors-only index (add and search vectors; texts need an embedder).
        precision: "fp32" (exact), "int8" or "binary" (quantized codes, rescored with the fp32 vectors).
        dim: vector dimension; default the embedder's, or that of the first vectors added.
        sparse_encoder: a :class:`~embfast.SparseEncoder`: texts added are also encoded into sparse rows,
            and ``search(mode="sparse" | "hybrid")`` works (:mod:`embfast.index_sparse`). Default None.
    """

    def __init__(self, embedder=None, *, precision: str = "fp32", dim: int | None = None, sparse_encoder=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.embedder = embedder
        self.precision = precision
        self.model: dict | None = _model_info(embedder) if embedder is not None else None
        if dim is None and embedder is not None:
            dim = int(embedder.dim)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if dim is not None and embedder is not None and dim != embedder.dim:
            raise ValueError(f"dim must be the embedder's dimension {embedder.dim}, got {dim}")
        self.dim: int | None = None if dim is None else int(dim)
        if embedder is None and sparse_encoder is not None and dim is None:
            self.dim = 0  # a sparse-only index: rows carry no dense vector
        self._vectors = _Rows(np.zeros((0, self.dim or 0), np.float32))
        self._codes: _Rows | None = None
        self._ranges: np.ndarray | None = None
        self._ranges_n = 0
        self._id_kind: str | None = None  # "int" | "str"
        self._int_ids = _Rows(np.zeros(0, np.int64))
        self._str_ids = _Strings()
        self._id_set: set | None = None
        self._texts = _Strings()
        self._meta = _Strings()
        self.path: Path | None = None
        from embfast.index_sparse import SparseRows, sparse_model_info

        self.sparse_encoder = sparse_encoder
        self.sparse_model = None if sparse_encoder is None else sparse_model_info(sparse_encoder)
        self._sparse = None if sparse_encoder is None else SparseRows(sparse_encoder.vocab_size)

    # ---- basics --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._vectors)

    def __repr__(self) -> str:
        model = self.model["name"] if self.model else None
        return f"Index({len(self)} x {self.dim}, precision={self.precision!r}, model={model!r})"

    def id_at(self, row: int):
        """The id of row ``row`` (int or str)."""
        if self._id_kind == "str":
            return self._str_ids.get(row)
        return int(self._int_ids.full()[row])

    def text_at(self, row: int) -> str | None:
        """The stored text of row ``row`` (None when none was stored)."""
        return self._texts.get(row)

    def metadata_at(self, row: int) -> dict | None:
        """The metadata of row ``row`` (None when none was given)."""
        raw = self._meta.get(row)
        return None if raw is None else json.loads(raw)

    # ---- add ----------------------------------------------------------------------------------------------------
    def add(self, items, ids=None, metadata=None, *, texts=None, batch_size: int = 32, sparse=None) -> None:
        """Add texts (embedded with the index's embedder) or vectors.

        Args:
            items: a str or a list of str (embedded with ``Embedder.encode_document``, i.e. the model's
                document prompt if it has one, and stored as the rows' texts), or vectors
                (dim,) / (n, dim) (finite floats). Vectors are stored L2-normalized.
            ids: one unique int or str per row (all of one kind, per index); default: consecutive ints
                after the largest id so far, from 0 (only while the index has int ids).
            metadata: one JSON-serializable dict (or None) per row.
            texts: with vectors, the text to store for each row (None entries allowed).
            batch_size: texts per ONNX Runtime call when embedding.
            sparse: for an index with sparse rows: their (n, vocab) sparse vectors (default: the sparse
                encoder's ``encode_document`` of the texts; vectors added without texts need them).

        Adding to a memory-mapped index keeps the new rows in memory; the next search copies the
        mapped vectors into memory once (saving streams both to the file and needs no copy).

        Raises:
            TypeError / ValueError saying what was expected: wrong dims, NaN, duplicate or mixed ids, lengths
            that differ, texts with no embedder.
        """
        vecs, texts = self._as_vectors(items, texts, batch_size, "items")
        n = vecs.shape[0]
        if n == 0:
            return
        if texts is not None and len(texts) != n:
            raise ValueError(f"texts must have one entry per row ({n}), got {len(texts)}")
        if texts is not None:
            for i, t in enumerate(texts):
                if t is not None and not isinstance(t, str):
                    raise TypeError(f"texts[{i}] must be a str or None, got {type(t).__name__}")
                if t is not None:
                    check_text(t, f"texts[{i}]", index=i)
        meta = self._check_metadata(metadata, n)
        kind, new_ids = self._check_ids(ids, n)
        if self._sparse is not None:
            if sparse is None and (texts is None or any(t is None for t in texts)):
                raise ValueError("this index keeps sparse rows: add texts, or vectors with texts= or sparse=")
            if sparse is None:
                if self.sparse_encoder is None:
                    raise TypeError("this index keeps sparse rows: load it with sparse_encoder= to add texts")
                sparse = self.sparse_encoder.encode_document(texts, batch_size=batch_size)
            if sparse.shape[0] != n:
                raise ValueError(f"sparse must have one row per item ({n}), got {sparse.shape[0]}")
            self._sparse.append(sparse)
        elif sparse is not None:
            raise ValueError("sparse= needs an index with sparse rows: Index(embedder, sparse_encoder=...)")
        if self.dim is None:
            self.dim = int(vecs.shape[1])
            self._vectors = _Rows(np.zeros((0, self.dim), np.float32))
        self._vectors.append(vecs)
        if kind == "int":
            self._int_ids.append(new_ids)
        else:
            self._str_ids.append(new_ids)
        if self._id_set is not None:
            self._id_set.update(new_ids.tolist() if kind == "int" else new_ids)
        self._id_kind = kind
        if texts is None:
            self._texts.extend_empty(n)
        else:
            self._texts.append(texts)
        self._meta.append(meta)

    def _as_vectors(self, items, texts, batch_size, name) -> tuple[np.ndarray, list | None]:
        from embfast.encoder import as_text_list

        if isinstance(items, str) or (isinstance(items, (list, tuple)) and items and isinstance(items[0], str)):
            if texts is not None:
                raise TypeError("texts= is for vectors; when adding texts they are stored as they are")
            strs, _ = as_text_list(items, name)
            return self._encode(strs, batch_size, "query" if name == "queries" else "document"), strs
        if isinstance(items, (list, tuple)) and not items:
            return np.zeros((0, self.dim or 0), np.float32), None
        arr = np.asarray(items)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be texts or numeric vectors, got dtype {arr.dtype}")
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"{name} must be vectors (dim,) or (n, dim), got shape {arr.shape}")
        if self.dim is not None and arr.shape[1] != self.dim:
            raise ValueError(f"{name} must have dim {self.dim} (this index's), got shape {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise ValueError(f"{name} must be finite, got NaN or inf in row {int(np.flatnonzero(bad)[0])}")
        return kernels.l2_normalize(arr), texts

    def _encode(self, texts: list[str], batch_size: int, role: str) -> np.ndarray:
        """Embed texts: documents with the model's document prompt, queries with its query prompt (if any)."""
        if self.embedder is None and self.dim == 0 and self.sparse_encoder is not None:
            return np.zeros((len(texts), 0), np.float32)  # sparse-only: the sparse rows are made in add()
        if self.embedder is None:
            built = f" (this index was built with model {self.model['name']!r}: Index.load(path, " \
                    f"embedder=Embedder({self.model.get('source')!r})))" if self.model else ""
            raise TypeError(f"texts need an embedder: create the index with Index(embedder){built}, "
                            "or pass vectors")
        encode = self.embedder.encode_query if role == "query" else self.embedder.encode_document
        return kernels.l2_normalize(encode(texts, batch_size=batch_size))

    @staticmethod
    def _check_metadata(metadata, n: int) -> list:
        if metadata is None:
            return [None] * n
        if not isinstance(metadata, (list, tuple)) or len(metadata) != n:
            got = len(metadata) if isinstance(metadata, (list, tuple)) else type(metadata).__name__
            raise ValueError(f"metadata must be a list with one dict (or None) per row ({n}), got {got}")
        out = []
        for i, m in enumerate(metadata):
            if m is not None and not isinstance(m, dict):
                raise TypeError(f"metadata[{i}] must be a dict or None, got {type(m).__name__}")
            try:
                out.append(None if m is None else json.dumps(m, ensure_ascii=False, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metadata[{i}] must be JSON-serializable: {exc}") from exc
            if out[-1] is not None:  # stored as UTF-8: a lone surrogate in a key or value cannot be
                check_text(out[-1], f"metadata[{i}]", index=i)
        return out

    def _check_ids(self, ids, n: int):
        if ids is None:
            if self._id_kind == "str":
                raise ValueError("ids must be given: this index has str ids, so new rows need theirs")
            start = int(self._int_ids.full().max()) + 1 if len(self) else 0  # never reuses an explicit id
            return "int", np.arange(start, start + n, dtype=np.int64)
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or len(ids) != n:
            got = len(ids) if isinstance(ids, (list, tuple)) else type(ids).__name__
            raise ValueError(f"ids must be a list with one id per row ({n}), got {got}")
        if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            kind, vals = "int", np.asarray(ids, dtype=np.int64)
        elif all(isinstance(i, str) and i for i in ids):
            kind, vals = "str", list(ids)
            check_texts(vals, "ids")
        else:
            bad = next(i for i in ids if not (isinstance(i, str) and i))
            raise TypeError(f"ids must be all ints or all non-empty strs, got {bad!r} ({type(bad).__name__})")
        if self._id_kind is not None and len(self) and kind != self._id_kind:
            raise TypeError(f"ids must be {self._id_kind}s like the index's existing ids, got {kind}s")
        listed = vals.tolist() if kind == "int" else vals
        if len(set(listed)) != n:
            raise ValueError("ids must be unique, got duplicates within this add")
        if len(self):
            if self._id_set is None:
                self._id_set = {self.id_at(r) for r in range(len(self))} if kind == "str" else \
                    set(self._int_ids.full().tolist())
            dup = next((i for i in listed if i in self._id_set), None)
            if dup is not None:
                raise ValueError(f"ids must be unique, got {dup!r} which the index already holds")
        return kind, vals

    # ---- quantized codes ---------------------------------------------------------------------------------------
    def _ensure_codes(self) -> None:
        n = len(self)
        if self.precision == "fp32" or n == 0:
            return
        have = len(self._codes) if self._codes is not None else 0
        if self.precision == "int8" and (self._ranges is None or n > 2 * self._ranges_n):
            lo = np.full(self.dim, np.inf, np.float32)
            hi = np.full(self.dim, -np.inf, np.float32)
            for b in self._vectors.blocks():
                lo = np.minimum(lo, b.min(axis=0))
                hi = np.maximum(hi, b.max(axis=0))
            self._ranges, self._ranges_n, have, self._codes = np.stack([lo, hi]), n, 0, None
        if have == n:
            return
        new = []
        seen = 0
        for b in self._vectors.blocks():
            if seen + b.shape[0] > have:
                part = b[max(have - seen, 0):]
                new.append(kernels.quantize(part, self.precision, ranges=self._ranges).codes)
            seen += b.shape[0]
        codes = np.concatenate(new)
        if self._codes is None:
            self._codes = _Rows(codes)
        else:
            self._codes.append(codes)

    def _quantized(self) -> kernels.QuantizedCorpus:
        self._ensure_codes()
        return kernels.QuantizedCorpus(self.precision, self._codes.full(), self.dim, self._ranges)

    # ---- search -----------------------------------------------------------------------------------------------
    def search(self, queries, top_k: int = 10, *, rescore: bool = True, rescore_multiplier: int = 4,
               batch_size: int = 32, rerank=None, rerank_candidates: int = 100, mode: str | None = None,
               fusion: str = "weighted", sparse_weight: float = 0.3) -> list[list[dict]]:
        """Rank the index's rows for each query.

        Args:
            queries: a str or list of str (embedded with the index's embedder, ``encode_query``: the model's
                query prompt if it has one), or vectors (dim,) / (q, dim).
            top_k: hits per query; more than the index holds returns them all; 0 returns empty lists.
            rescore: int8 / binary: re-rank ``rescore_multiplier * top_k`` candidates by exact fp32 cosine
                (default True); False ranks by the codes alone and returns cosine estimates on the same
                scale (int8: cosine with the dequantized row; binary: 1 - 2 * hamming / dim).
            rescore_multiplier: candidates per hit taken from the quantized codes (default 4).
            rerank: a :class:`~embfast.CrossEncoder` (one label): the best ``max(top_k, rerank_candidates)``
                rows are scored again with each query text and re-sorted (default None: no reranking).
                Needs text queries and rows added with texts.
            rerank_candidates: rows per query given to ``rerank`` (default 100).
            mode: "dense" (default; "sparse" for a sparse-only index), "sparse" (exact dot product of the
                sparse rows) or "hybrid" (the
                dense cosine and the sparse dot product of every row fused; text queries only). See
                :mod:`embfast.index_sparse` and :mod:`embfast.hybrid`.
            fusion: hybrid's fusion: "weighted" (default: z-scored scores, ``sparse_weight`` on the sparse
                side) or "rrf" (reciprocal rank fusion, k = 60). sparse_weight: default 0.3.

        Returns:
            One list per query, best first, of ``{"id", "score", "text", "metadata"}``; scores are
            cosine similarities (fp32, or rescored) or cosine estimates (``rescore=False``); ties go to
            the earlier row. With ``rerank``, ``score`` is the cross-encoder's and ``retrieval_score`` the cosine.
        """
        if rerank is not None:  # retrieve, then rerank (embfast.cross_encoder.rerank_search)
            from embfast.cross_encoder import rerank_search

            return rerank_search(self, queries, top_k, rerank, rerank_candidates, rescore=rescore,
                                 rescore_multiplier=rescore_multiplier, batch_size=batch_size)
        kernels._check_k(top_k)
        if mode is None:
            mode = "sparse" if self.dim == 0 and self._sparse is not None else "dense"
        if mode not in ("dense", "sparse", "hybrid"):
            raise ValueError(f"mode must be one of dense, sparse, hybrid, got {mode!r}")
        if mode != "dense":
            from embfast import index_sparse

            if isinstance(queries, (list, tuple)) and not queries:
                return []
            return index_sparse.search(self, queries, top_k, mode=mode, fusion=fusion, sparse_weight=sparse_weight,
                                       batch_size=batch_size)
        if isinstance(rescore_multiplier, bool) or not isinstance(rescore_multiplier, int) or rescore_multiplier < 1:
            raise ValueError(f"rescore_multiplier must be an int >= 1, got {rescore_multiplier!r}")
        if isinstance(queries, (list, tuple)) and not queries:
            return []
        q, _ = self._as_vectors(queries, None, batch_size, "queries")
        if len(self) == 0:
            return [[] for _ in range(q.shape[0])]
        vectors = self._vectors.full()
        if self.precision == "fp32":
            scores, idx = kernels.topk_cosine(q, vectors, top_k, assume_normalized=True)
        else:
            scores, idx = kernels.topk_quantized(q, self._quantized(), top_k, rescore_multiplier=rescore_multiplier,
                                                 rescore_vectors=vectors if rescore else None, assume_normalized=True)
        out = []
        for s_row, i_row in zip(scores.tolist(), idx.tolist(), strict=True):
            out.append([{"id": self.id_at(i), "score": s, "text": self.text_at(i), "metadata": self.metadata_at(i)}
                        for s, i in zip(s_row, i_row, strict=True) if i >= 0])
        return out

    def rows_of(self, ids, name: str = "ids") -> np.ndarray:
        """Row numbers (int64) of the given ids; KeyError naming the first id the index does not hold."""
        if isinstance(ids, (str, int, np.integer)):
            ids = [ids]
        ids = list(ids)
        if self._id_kind == "str":
            lookup = {self._str_ids.get(r): r for r in range(len(self))}
        else:
            lookup = {int(v): r for r, v in enumerate(self._int_ids.full().tolist())} if len(self) else {}
        rows = []
        for value in ids:
            key = int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
            if key not in lookup:
                raise KeyError(f"{name}: id {value!r} is not in this index ({len(self)} rows, "
                               f"{self._id_kind or 'int'} ids)")
            rows.append(lookup[key])
        return np.asarray(rows, dtype=np.int64)

    def recommend(self, positive, negative=(), top_k: int = 10, *, rescore: bool = True,
                  rescore_multiplier: int = 4) -> list[dict]:
        """Rows like the ``positive`` examples and unlike the ``negative`` ones, the examples left out.

        Qdrant's ``average_vector`` strategy: the query is ``avg(positive) + (avg(positive) - avg(negative))``
        (just ``avg(positive)`` without negatives) over the stored unit vectors, then an ordinary
        :meth:`search` (cosine; int8 / binary rescored as there).

        Args:
            positive: ids of liked rows (at least one).
            negative: ids of disliked rows (default none).
            top_k: hits (default 10), not counting the examples.

        Returns:
            ``[{"id", "score", "text", "metadata"}, ...]`` best first, as one row of :meth:`search`.

        Raises:
            ValueError: no positive example; KeyError: an id the index does not hold.
        """
        kernels._check_k(top_k)
        pos = self.rows_of(positive, "positive")
        neg = self.rows_of(negative, "negative")
        if pos.size == 0:
            raise ValueError("positive must name at least one id")
        vectors = self._vectors.full()
        avg_pos = vectors[pos].astype(np.float64).mean(axis=0)
        query = avg_pos if neg.size == 0 else 2 * avg_pos - vectors[neg].astype(np.float64).mean(axis=0)
        examples = set(np.concatenate([pos, neg]).tolist())
        hits = self.search(query.astype(np.float32)[None, :], top_k + len(examples), rescore=rescore,
                           rescore_multiplier=rescore_multiplier)[0]
        skip = {self.id_at(r) for r in examples}
        return [h for h in hits if h["id"] not in skip][:top_k]

    # ---- save / load ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` atomically (a temporary file renamed over it); returns the path.

        The fp32 vectors are always stored (they rescore quantized searches). An index loaded
        memory-mapped from ``path`` may be saved back to ``path``.
        """
        self._ensure_codes()
        dim = self.dim or 0

        def fill(section) -> dict:
            n = len(self)
            section("vectors", self._vectors.blocks(), np.float32, (n, dim))
            if self._codes is not None:
                c = self._codes
                section("codes", c.blocks(), c.base.dtype, (n, *c.base.shape[1:]))
            if self._ranges is not None:
                section("ranges", [self._ranges], np.float32, (2, dim))
            if self._id_kind == "str":
                self._write_strings(section, "ids", self._str_ids)
            else:
                section("ids", self._int_ids.blocks(), np.int64, (n,))
            self._write_strings(section, "texts", self._texts)
            self._write_strings(section, "metadata", self._meta)
            sparse = None if self._sparse is None else {"model": self.sparse_model, **self._sparse.write(section)}
            return {"model": self.model, "precision": self.precision, "dim": self.dim, "count": n,
                    "id_kind": self._id_kind or "int", "int8_ranges_count": self._ranges_n, "sparse": sparse}

        path = write_index_file(path, fill)
        self.path = path
        return path

    @staticmethod
    def _write_strings(section, name: str, col: _Strings) -> None:
        pieces, offsets = col.parts()
        section(f"{name}.blob", pieces, np.uint8, (int(offsets[-1]),))
        section(f"{name}.offsets", [offsets], np.int64, (len(offsets),))

    @classmethod
    def load(cls, path: str | Path, embedder=None, *, mmap: bool = True, verify: bool = True,
             sparse_encoder=None) -> Index:
        """Open an index file.

        Args:
            path: a file written by :meth:`save`.
            embedder: the model for text queries and adds; must be the model the index was built with
                (same name and source checksum, same dim), else :class:`ModelMismatchError`.
            mmap: map the arrays from the file (read lazily, shared between processes) instead of reading them.
            verify: check every section's sha256 (one sequential read of the file); the end marker, the
                manifest's checksum and the file size are always checked.
            sparse_encoder: for an index with sparse rows: the :class:`~embfast.SparseEncoder` they were built
                with (checked like ``embedder``); needed to add texts or search with mode sparse / hybrid.

        Raises:
            FileNotFoundError; IndexCorruptError (a ValueError) for a truncated, damaged or foreign file;
            ModelMismatchError (a ValueError) for another model.
        """
        path = Path(path)
        man = read_index_manifest(path)
        secs = man["sections"]
        if verify:
            _verify_sections(path, secs)
        index = cls(None, precision=man["precision"], dim=man["dim"] or None)
        index.dim = man["dim"]
        index.model = man["model"]
        if embedder is not None:
            check_model(man, embedder, path)
            index.embedder = embedder

        def arr(name: str) -> np.ndarray:
            s = secs[name]
            dtype, shape = np.dtype(s["dtype"]), tuple(s["shape"])
            if s["nbytes"] == 0:
                return np.zeros(shape, dtype)
            if mmap:
                return np.memmap(path, dtype=dtype, mode="r", offset=s["offset"], shape=shape)
            with open(path, "rb") as fh:
                fh.seek(s["offset"])
                return np.frombuffer(fh.read(s["nbytes"]), dtype=dtype).reshape(shape).copy()

        index._vectors = _Rows(arr("vectors"))
        if "codes" in secs:
            index._codes = _Rows(arr("codes"))
        if "ranges" in secs:
            index._ranges = np.array(arr("ranges"))
            index._ranges_n = int(man.get("int8_ranges_count") or 0)
        index._id_kind = man["id_kind"] if man["count"] else None
        if man["id_kind"] == "str":
            index._str_ids = _Strings(arr("ids.blob"), np.array(arr("ids.offsets")))
        else:
            index._int_ids = _Rows(arr("ids"))
        index._texts = _Strings(arr("texts.blob"), np.array(arr("texts.offsets")))
        index._meta = _Strings(arr("metadata.blob"), np.array(arr("metadata.offsets")))
        if "sparse" in man:
            from embfast.index_sparse import SparseRows

            index._sparse = SparseRows.read(arr, man["sparse"], man["count"])
            index.sparse_model = man["sparse"].get("model")
            if sparse_encoder is not None:
                _check_sparse_model(index.sparse_model, sparse_encoder, path)
                index.sparse_encoder = sparse_encoder
        elif sparse_encoder is not None:
            raise ValueError(f"{path} holds no sparse rows; build it with Index(embedder, sparse_encoder=...)")
        index.path = path
        return index


def write_index_file(path: str | Path, fill) -> Path:
    """Write an index file atomically (a temporary file renamed over ``path``); returns the path.

    ``fill(section)`` writes the sections in file order by calling ``section(name, pieces, dtype, shape)``
    (``pieces``: an iterable of arrays, consumed one at a time, so a section may be streamed from disk;
    its sha256 is computed as it is written) and returns the manifest fields ``model``, ``precision``,
    ``dim``, ``count``, ``id_kind``, ``int8_ranges_count`` and ``sparse`` (None: no sparse rows).
    ``section`` also has ``section.flush()`` (the bytes written so far reach the file, e.g. to read a
    finished section back), ``section.path`` (the temporary file) and ``section.sections`` (name ->
    offset, nbytes, dtype, shape, sha256 of the sections written so far). This is the one writer of the
    format: :meth:`Index.save` and the streaming builds (:mod:`embfast.index_build`) both use it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sections: dict[str, dict] = {}
    try:
        with open(tmp, "wb") as fh:
            fh.write(MAGIC)

            def section(name: str, pieces, dtype, shape) -> None:
                pad = (-fh.tell()) % _ALIGN
                fh.write(b"\0" * pad)
                offset, h, nbytes = fh.tell(), hashlib.sha256(), 0
                for piece in pieces:
                    buf = np.ascontiguousarray(piece, dtype=dtype).tobytes()
                    h.update(buf)
                    fh.write(buf)
                    nbytes += len(buf)
                sections[name] = {"offset": offset, "nbytes": nbytes, "dtype": np.dtype(dtype).str,
                                  "shape": list(shape), "sha256": h.hexdigest()}
                if nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                    raise RuntimeError(f"index section {name!r}: wrote {nbytes} bytes for shape {list(shape)}")

            section.flush = fh.flush
            section.path = tmp
            section.sections = sections
            f = fill(section)
            manifest = {"format": INDEX_FORMAT, "embfast": _version(),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": f["model"],
                        "precision": f["precision"], "dim": f["dim"], "count": f["count"], "id_kind": f["id_kind"],
                        "int8_ranges_count": f["int8_ranges_count"], "sections": sections,
                        **({"sparse": f["sparse"]} if f.get("sparse") else {})}
            head = json.dumps(manifest, indent=1).encode("utf-8")
            fh.write(head)
            fh.write(_TRAILER.pack(len(head), hashlib.sha256(head).digest(), MAGIC))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        from embfast.io import fsync_dir

        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _version() -> str:
    from embfast import __version__

    return __version__


def check_model(manifest: dict, embedder, path: str | Path = "the index") -> None:
    """Refuse an embedder whose model (name, source checksum, dim) differs from the index's."""
    want = manifest.get("model")
    got = _model_info(embedder)
    if want is not None and (want.get("name"), want.get("source_checksum")) != (got["name"], got["source_checksum"]):
        raise ModelMismatchError(
            f"{path} was built with model {want.get('name')!r} (checksum {str(want.get('source_checksum'))[:12]}), "
            f"but the embedder is {got['name']!r} (checksum {str(got['source_checksum'])[:12]}); use the model the "
            f"index was built with ({want.get('source')}) or build a new index")
    if manifest.get("dim") is not None and manifest["dim"] != got["dim"]:
        raise ModelMismatchError(f"{path} holds vectors of dim {manifest['dim']}, but the embedder makes dim "
                                 f"{got['dim']} (truncate_dim {got['truncate_dim']}); use the same truncate_dim")


def read_index_manifest(path: str | Path) -> dict:
    """The manifest of an index file (model, precision, dim, count, sections), after checking its integrity.

    Raises FileNotFoundError, or IndexCorruptError when the file is truncated, damaged or not an index.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"index not found: {path}")
    if path.is_dir():
        raise IndexCorruptError(f"{path} is a folder, not an embfast index file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise IndexCorruptError(f"{path} is not an embfast index (it does not start with {MAGIC.decode()})")
        if size < len(MAGIC) + _TRAILER.size:
            raise IndexCorruptError(f"{path} is truncated ({size} bytes); rebuild the index or restore a copy")
        fh.seek(size - _TRAILER.size)
        head_len, digest, end = _TRAILER.unpack(fh.read(_TRAILER.size))
        if end != MAGIC or head_len > size - len(MAGIC) - _TRAILER.size:
            raise IndexCorruptError(f"{path} is truncated or damaged (no valid end marker); rebuild the index or "
                                    "restore a copy")
        fh.seek(size - _TRAILER.size - head_len)
        head = fh.read(head_len)
    if hashlib.sha256(head).digest() != digest:
        raise IndexCorruptError(f"{path} is corrupt: its manifest fails its sha256 checksum; rebuild the index or "
                                "restore a copy")
    man = json.loads(head)
    if man.get("format") != INDEX_FORMAT:
        raise IndexCorruptError(f"{path} has index format {man.get('format')}, this embfast reads format "
                                f"{INDEX_FORMAT}; rebuild it")
    data_end = size - _TRAILER.size - head_len
    for name, s in man["sections"].items():
        if s["offset"] + s["nbytes"] > data_end:
            raise IndexCorruptError(f"{path} is truncated: section {name!r} ends at byte {s['offset'] + s['nbytes']}"
                                    f" but the data ends at {data_end}; rebuild the index or restore a copy")
    return man


def _verify_sections(path: Path, sections: dict) -> None:
    with open(path, "rb") as fh:
        for name, s in sections.items():
            fh.seek(s["offset"])
            h, left = hashlib.sha256(), s["nbytes"]
            while left:
                block = fh.read(min(left, _READ_BLOCK))
                if not block:
                    raise IndexCorruptError(f"{path} is truncated inside section {name!r}")
                h.update(block)
                left -= len(block)
            if h.hexdigest() != s["sha256"]:
                raise IndexCorruptError(f"{path} is corrupt: section {name!r} fails its sha256 checksum; rebuild the "
                                        "index or restore a copy")
