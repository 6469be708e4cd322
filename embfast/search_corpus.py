"""The corpus that ``/v1/search`` ranks: unit vectors from an .npy file (with one text per line) or an embfast
Index, loaded and checked once at start-up; search and recommendation by example over it.

Search logic, no transport: :mod:`embfast.server` calls it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embfast.text import check_texts, read_lines


def load_corpus(path, *, max_dim: int) -> np.ndarray:
    """Load search vectors (n, dim) from an .npy file, memory-mapped when already float32 and C-ordered.

    Args:
        path: an .npy file of (n, dim) float embeddings, 1 <= dim <= ``max_dim``.
        max_dim: the model's output dimension.

    Raises:
        FileNotFoundError; ValueError when the suffix, shape, dtype or dim is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.suffix != ".npy":
        raise ValueError(f"corpus must be an .npy file of (n, dim) float embeddings, got {path.name}")
    return _check_corpus(np.load(path, mmap_mode="r", allow_pickle=False), path.name, max_dim)


def _check_corpus(vecs, what: str, max_dim: int) -> np.ndarray:
    vecs = np.asarray(vecs) if not isinstance(vecs, np.ndarray) else vecs
    if vecs.ndim != 2 or vecs.dtype.kind not in "fiu":
        raise ValueError(f"corpus {what} must be a 2-D numeric array (n, dim), got {vecs.dtype} shape {vecs.shape}")
    if not 1 <= vecs.shape[1] <= max_dim:
        raise ValueError(f"corpus {what} dim must be in [1, {max_dim}] (the model's), got {vecs.shape[1]}")
    if vecs.dtype != np.float32 or not vecs.flags.c_contiguous:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    return vecs


def load_corpus_texts(texts, n: int) -> list[str]:
    """The corpus texts: a list of str, or a UTF-8 file with one text per line; exactly ``n`` of them.

    Lines end at ``\\n`` only (:mod:`embfast.text`), as in ``embfast encode``, so row i is line i.
    Raises ValueError for a count mismatch, invalid UTF-8 or a lone surrogate (with its line).
    """
    if isinstance(texts, (str, Path)):
        try:
            lines = read_lines(texts)
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus texts file {texts}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        what = f"corpus texts file {texts}"
    elif isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts):
        lines, what = list(texts), "corpus_texts"
        check_texts(lines, "corpus_texts")
    else:
        raise TypeError(f"corpus_texts must be a path or a list of str, got {type(texts).__name__}")
    if len(lines) != n:
        raise ValueError(f"{what} must have one text per corpus vector ({n}), got {len(lines)}")
    return lines


class SearchCorpus:
    """What /v1/search ranks: unit-length vectors (n, dim) with optional texts, or an embfast Index.

    Build with :meth:`open`. ``search`` takes unit-length query vectors (q, dim) and
    returns one list per query, best first, of ``{"id", "score"}`` plus ``"text"``
    (and, for an Index, ``"metadata"``) where known; ``id`` is the row number for
    vectors, the Index's id for an Index. Scores are cosine similarities.
    """

    def __init__(self, vectors: np.ndarray | None = None, texts: list[str] | None = None, index=None,
                 path: str | None = None):
        self.vectors, self.texts, self.index, self.path = vectors, texts, index, path

    @classmethod
    def open(cls, corpus, texts, embedder) -> SearchCorpus:
        """``corpus``: an .npy path, an (n, dim) array, an embfast index file or :class:`embfast.Index`.

        Raises:
            FileNotFoundError; ValueError for a wrong shape, dim, line count or model (an Index built
            with another model); TypeError for a wrong type.
        """
        from embfast.index import Index

        dim = embedder.dim
        if isinstance(corpus, (str, Path)) and Path(corpus).suffix != ".npy":
            if not Path(corpus).is_file():
                raise FileNotFoundError(f"corpus file not found: {corpus}")
            corpus = Index.load(corpus, embedder)
        if isinstance(corpus, Index):
            if texts is not None:
                raise ValueError("corpus_texts is for an .npy corpus; an embfast index holds its own texts")
            if corpus.dim is not None and corpus.dim != dim:
                raise ValueError(f"the index's dim must be the model's ({dim}), got {corpus.dim}")
            return cls(index=corpus, path=str(corpus.path) if corpus.path else None)
        path = None
        if isinstance(corpus, (str, Path)):
            path, vecs = str(corpus), load_corpus(corpus, max_dim=dim)
        else:
            vecs = _check_corpus(corpus, "array", dim)
        lines = None if texts is None else load_corpus_texts(texts, vecs.shape[0])
        # Unit rows once, here: each search is then one inner product (cosine; zero rows score 0).
        from embfast import kernels

        return cls(vectors=kernels.l2_normalize(vecs), texts=lines, path=path)

    @property
    def dim(self) -> int:
        return int(self.index.dim) if self.index is not None else int(self.vectors.shape[1])

    def info(self) -> dict:
        size = len(self.index) if self.index is not None else int(self.vectors.shape[0])
        return {"kind": "index" if self.index is not None else "vectors", "size": size, "dim": self.dim,
                "path": self.path, "texts": self.index is not None or self.texts is not None}

    def recommend(self, positive: list, negative: list, top_k: int) -> list[dict]:
        """Rows like ``positive`` and unlike ``negative`` (ids; row numbers for vectors), examples left out:
        Qdrant's average_vector strategy (see :meth:`embfast.Index.recommend`). KeyError for an unknown id."""
        if self.index is not None:
            return self.index.recommend(positive, negative, top_k)
        from embfast.search import semantic_search

        n = self.vectors.shape[0]
        for field, ids in (("positive", positive), ("negative", negative)):
            for v in ids:
                if not isinstance(v, int) or not 0 <= v < n:
                    raise KeyError(f"{field}: id {v!r} is not in this corpus (row numbers 0..{n - 1})")
        avg = self.vectors[positive].astype(np.float64).mean(axis=0)
        query = avg if not negative else 2 * avg - self.vectors[negative].astype(np.float64).mean(axis=0)
        skip = set(positive) | set(negative)
        query = query.astype(np.float32)[None, :]
        hits = semantic_search(query, self.vectors, top_k + len(skip), threads=1)[0]
        return [{"id": h["corpus_id"], "score": h["score"]} | ({} if self.texts is None else
                                                                {"text": self.texts[h["corpus_id"]]})
                for h in hits if h["corpus_id"] not in skip][:top_k]

    def search(self, q: np.ndarray, top_k: int) -> list[list[dict]]:
        if self.index is not None:
            return self.index.search(q, top_k)
        from embfast.search import semantic_search

        # One kernel thread: the batcher's ONNX Runtime threads already have the cores.
        hits = semantic_search(q, self.vectors, top_k, threads=1, assume_normalized=True)
        out = []
        for row in hits:
            out.append([{"id": h["corpus_id"], "score": h["score"]} if self.texts is None else
                        {"id": h["corpus_id"], "score": h["score"], "text": self.texts[h["corpus_id"]]}
                        for h in row])
        return out
