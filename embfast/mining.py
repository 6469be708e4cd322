"""What people do with a set of embeddings: paraphrase mining, near-duplicate groups, community detection.

All three are blocked self-joins over unit vectors: tiles of scores (ONNX Runtime's sgemm, :mod:`embfast.gemm`)
merged into native top-k heaps or scanned for pairs over a threshold (through an exact int8 screen first,
:mod:`embfast.screen`), so memory stays at one tile of scores plus the results, never an (n, n) matrix.

- :func:`paraphrase_mining`: sentence-transformers' ``util.paraphrase_mining_embeddings`` (same result, same
  ``max_pairs`` meaning), each row's ``top_k`` nearest others, each pair once.
- :func:`near_duplicate_pairs` / :func:`duplicate_groups`: every pair at or above a threshold (no top-k cap),
  and their connected components (single linkage), for ``embfast dedup``.
- :func:`community_detection`: sentence-transformers' ``util.community_detection`` (Fast Community Detection):
  same communities, each with its central element first, largest first.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable

import numpy as np

from embfast import gemm, kernels
from embfast import screen as _screen

#: float32 scores held at once by the blocked joins (64 MiB).
BLOCK_SCORES = 16 * 2**20


#: rows :func:`unit_rows` converts at a time (its temporaries stay small)
UNIT_CHUNK = 16384


def _release_pages(vectors) -> None:
    """Drop the resident pages of a read-only memory-mapped array (madvise DONTNEED: the file is untouched and
    pages come back from it on the next read), so reading it once does not keep it all in RSS."""
    mm = getattr(vectors, "_mmap", None)
    if mm is None or getattr(vectors, "mode", None) != "r":
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):
        mm.madvise(mmap.MADV_DONTNEED)


def unit_rows(vectors, name: str = "vectors") -> np.ndarray:
    """``vectors`` (n, dim) as a new C-contiguous float32 array of unit rows (zero rows stay zero).

    Converted in chunks of :data:`UNIT_CHUNK` rows; a read-only memory-mapped input (``np.load(path,
    mmap_mode="r")``) has its pages released after each chunk, so only the float32 copy stays resident.

    Raises:
        TypeError: non-numeric data. ValueError: not 2-D, or NaN / inf (the first bad row is named).
    """
    arr = np.asarray(vectors)
    kernels.as_float32(arr[:0] if arr.ndim == 2 else arr, name, 2)  # dtype and shape errors, nothing copied
    if arr.shape[0] <= UNIT_CHUNK and not isinstance(vectors, np.memmap):
        chunks = [arr]
    else:
        chunks = (arr[a:a + UNIT_CHUNK] for a in range(0, arr.shape[0], UNIT_CHUNK))
    out = np.empty(arr.shape, np.float32)
    a = 0
    for chunk in chunks:
        x = kernels.as_float32(chunk, name, 2)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise ValueError(f"{name} must be finite, got NaN or inf in row {a + int(np.flatnonzero(bad)[0])}")
        out[a:a + x.shape[0]] = kernels.l2_normalize(x)
        a += x.shape[0]
        _release_pages(vectors)
    return out


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_threshold(threshold) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or \
            not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}")
    return float(threshold)


def _row_blocks(n: int, cols: int, progress: Callable[[int], None] | None = None):
    rows = max(1, min(4096, BLOCK_SCORES // max(cols, 1)))
    for start in range(0, n, rows):
        yield start, min(start + rows, n)
        if progress is not None:
            progress(min(start + rows, n) - start)


#: rows (and columns) of one square score tile of the symmetric self-join (2048 x 2048 float32 = 16 MiB)
SELF_TILE = 2048


def self_topk(x: np.ndarray, k: int, *, threads: int = 0,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each unit row's ``k`` best rows by inner product (itself included): scores (n, k), indices (n, k).

    A symmetric blocked self-join: only the tiles on and above the diagonal are computed (:mod:`embfast.gemm`), and an
    off-diagonal tile feeds both its rows' heaps and its columns' heaps (the native column merge reads the
    tile in place, strips of columns per thread: no transposed copy, which cost more than the product); so
    each pair is scored once (half the multiply-adds of a plain join). Results are sorted best first, ties
    to the lower index, as :func:`embfast.kernels.topk_cosine`. Without the
    native core, one plain join per block of rows.
    """
    n = x.shape[0]
    k = min(k, n)
    if not kernels.HAS_NATIVE or n == 0 or k == 0:
        parts = [kernels.topk_cosine(x[a:b], x, k, assume_normalized=True, threads=threads)
                 for a, b in _row_blocks(n, min(max(n, 1), kernels.BLAS_BLOCK_ROWS), progress)]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])
    core = kernels._core
    heap_s = np.empty((n, k), np.float32)
    heap_i = np.empty((n, k), np.int64)
    heap_n = np.zeros(n, np.int64)
    t = SELF_TILE
    buffer = np.empty(t * t, np.float32)  # every tile's scores, written by ONNX Runtime (embfast.gemm)
    # the diagonal tiles first: every heap then starts the off-diagonal tiles with the best of its own block, so
    # few of their scores pass its threshold (a heap's content does not depend on the order: ties go by index)
    for a in range(0, n, t):
        b = min(a + t, n)
        scores = gemm.float_products(x[a:b], x[a:b], out=buffer, threads=threads)
        core.topk_merge_block(scores, a, None, None, heap_s[a:b], heap_i[a:b], heap_n[a:b], threads)
    for a in range(0, n, t):
        b = min(a + t, n)
        for c in range(a + t, n, t):
            d = min(c + t, n)
            scores = gemm.float_products(x[a:b], x[c:d], out=buffer, threads=threads)
            core.topk_merge_block(scores, c, None, None, heap_s[a:b], heap_i[a:b], heap_n[a:b], threads)
            # the tile's columns feed the heaps of rows c:d (no transposed copy)
            core.topk_merge_block_columns(scores, a, heap_s[c:d], heap_i[c:d], heap_n[c:d], threads)
        if progress is not None:
            progress(b - a)
    core.topk_finalize(heap_s, heap_i, heap_n)
    return heap_s, heap_i


def paraphrase_mining(vectors, top_k: int = 100, threshold: float | None = None, *, max_pairs: int = 500_000,
                      threads: int = 0, progress: Callable[[int], None] | None = None) -> list[tuple[float, int, int]]:
    """The most similar pairs of a set of embeddings, each pair once, best first.

    sentence-transformers' ``util.paraphrase_mining_embeddings`` (its defaults ``top_k=100``,
    ``max_pairs=500000``), computed as a blocked self-join on the native top-k: each row's ``top_k + 1``
    nearest rows by cosine (itself usually among them) give directed candidates (score, i, j) with i != j;
    like sentence-transformers, the ``max_pairs - 1`` best candidates are kept, then each unordered pair
    once (i < j). Where sentence-transformers splits a corpus larger than its ``corpus_chunk_size``
    (100,000) and takes ``top_k + 1`` per chunk, this takes them over the whole set.

    Args:
        vectors: (n, dim) float embeddings (cosine: they need not be normalized).
        top_k: neighbours per row (default 100).
        threshold: keep only pairs scoring at least this (default None: all).
        max_pairs: candidate budget, as sentence-transformers (default 500,000).
        threads: native kernel threads (0 = all cores).
        progress: called with the rows done after each block (e.g. a tqdm ``update``).

    Returns:
        ``[(score, i, j), ...]`` with i < j, by score descending (ties by i, then j).

    Raises:
        ValueError: a bad argument or non-finite vectors; TypeError: non-numeric vectors.
    """
    top_k = _check_int("top_k", top_k, 1)
    max_pairs = _check_int("max_pairs", max_pairs, 2)
    threshold = _check_threshold(threshold)
    heap_s, heap_j = self_topk(unit_rows(vectors), top_k + 1, threads=threads, progress=progress)
    return pairs_from_neighbours(heap_s, heap_j, threshold=threshold, max_pairs=max_pairs)


def pairs_from_neighbours(heap_s: np.ndarray, heap_j: np.ndarray, *, threshold: float | None = None,
                          max_pairs: int = 500_000) -> list[tuple[float, int, int]]:
    """The second half of :func:`paraphrase_mining`: each row's neighbours (scores (n, k), rows (n, k), from
    :func:`self_topk`) -> the best ``max_pairs - 1`` directed candidates (a score cut found over slices of rows,
    then only the positions at or above it gathered; candidates tied at the cut taken in row order, where
    sentence-transformers leaves them to its priority queue) -> each unordered pair once, best first."""
    n = heap_s.shape[0]
    keep = max_pairs - 1
    step = 65536  # rows at a time: the temporaries stay at one slice plus the best ``keep`` scores

    def candidates(a: int):
        s, j = heap_s[a:a + step], heap_j[a:a + step]
        ok = (j >= 0) & (j != np.arange(a, a + s.shape[0], dtype=np.int64)[:, None])
        if threshold is not None:
            ok &= s >= threshold
        return s, ok

    # the cut: the keep-th best candidate score (a running best-``keep`` set over the slices), if there are more
    total = sum(int(np.count_nonzero(candidates(a)[1])) for a in range(0, n, step))
    cut = None
    if total > keep:
        best = np.empty(0, np.float32)
        for a in range(0, n, step):
            s, ok = candidates(a)
            best = np.concatenate([best, s[ok]])
            if best.size > 2 * keep:
                best = np.partition(best, best.size - keep)[best.size - keep:]
        cut = np.partition(best, best.size - keep)[best.size - keep]
    # every candidate above the cut, then ties at it in row order up to ``keep`` (only positions are gathered)
    above, ties = [], []
    for a in range(0, n, step):
        s, ok = candidates(a)
        r, c = np.nonzero(ok if cut is None else ok & (s > cut))
        above.append((r + a, c))
        if cut is not None:
            r, c = np.nonzero(ok & (s == cut))
            ties.append((r + a, c))
    rows = np.concatenate([r for r, _ in above] + [np.empty(0, np.int64)])
    cols = np.concatenate([c for _, c in above] + [np.empty(0, np.int64)])
    if ties:
        quota = keep - rows.size
        rows = np.concatenate([rows, np.concatenate([r for r, _ in ties])[:quota]])
        cols = np.concatenate([cols, np.concatenate([c for _, c in ties])[:quota]])
    s_all, i_all, j_all = heap_s[rows, cols], rows.astype(np.int64), heap_j[rows, cols]
    lo, hi = np.minimum(i_all, j_all), np.maximum(i_all, j_all)
    # each unordered pair once: the lower of its two directed scores, as sentence-transformers (which pops
    # its candidates lowest first) keeps; then best first, ties by (i, j)
    order = np.lexsort((hi, lo, s_all))
    key = lo[order] * n + hi[order]
    _, first = np.unique(key, return_index=True)
    pick = order[first]
    s_u, lo_u, hi_u = s_all[pick], lo[pick], hi[pick]
    final = np.lexsort((hi_u, lo_u, -s_u.astype(np.float64)))
    return list(zip(s_u[final].tolist(), lo_u[final].tolist(), hi_u[final].tolist(), strict=True))


def near_duplicate_pairs(vectors, threshold: float, *, progress: Callable[[int], None] | None = None,
                         start_row: int = 0, stop_row: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) whose cosine is at least ``threshold``: no per-row cap, each pair once.

    A blocked upper-triangle join: rows [a, b) against rows [a, n) in score tiles, so each pair is scored once;
    large joins find their candidates with an exact int8 screen first (:func:`upper_pairs`). ``start_row`` /
    ``stop_row`` restrict the first index to a range (a resumable job does the rows in parts).

    Returns:
        (i, j, score): int64, int64, float32 arrays, ordered by i, then j.
    """
    threshold = _check_threshold(threshold)
    if threshold is None:
        raise ValueError("threshold must be a number in [-1, 1], got None")
    return upper_pairs(unit_rows(vectors), threshold, start_row=start_row, stop_row=stop_row, progress=progress)


#: rows x columns of one tile of the int8 screen (int32 products: 2048 x 4096 = 32 MiB)
SCREEN_ROWS, SCREEN_COLS = 2048, 4096
#: smallest join (rows x columns) screened in int8; below it, one float32 pass costs as little
SCREEN_MIN_PAIRS = 2**22
#: a tile whose candidates exceed this share of its entries (a low threshold) is scored in float32 instead
SCREEN_MAX_SHARE = 1 / 32


def upper_pairs(x: np.ndarray, threshold: float, *, start_row: int = 0, stop_row: int | None = None,
                progress: Callable[[int], None] | None = None, screen: bool | None = None,
                quantized: _screen.Quantized | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`near_duplicate_pairs` on rows that are already unit length (float32, C-contiguous or memory-mapped).

    ``screen``: find candidates with exact int8 products and a proven bound first (:mod:`embfast.screen`), then
    score only those in float32: the same pairs, scores within float32 rounding of the plain join's. Default
    (None): screen joins of at least :data:`SCREEN_MIN_PAIRS` scores when the native core is present and
    ONNX Runtime's integer product is exact on this CPU; False: float32 tiles only. ``quantized``: ``x``
    already quantized (``embfast.screen.Quantized(x)``), for a caller that joins it in parts (else each call
    quantizes the rows from ``start_row`` on)."""
    n = x.shape[0]
    stop = n if stop_row is None else min(stop_row, n)
    if screen is None:
        screen = use_screen(x, start_row, stop)
    if screen:
        return _screened_pairs(x, threshold, start_row, stop, progress, quantized)
    rows = 2048  # square-ish tiles: each column tile is read once per 2048 rows
    cols = max(1, BLOCK_SCORES // rows)
    thr = np.float32(threshold)
    buffer = np.empty(rows * cols, np.float32)
    return _upper_join(x, start_row, stop, rows, cols, progress,
                       lambda a, b, c, d: _float_tile(x, thr, a, b, c, d, buffer))


def use_screen(x: np.ndarray, start_row: int, stop_row: int) -> bool:
    """Whether :func:`upper_pairs` screens the join of rows start_row..stop_row-1 by default (see there)."""
    return bool(kernels.HAS_NATIVE and x.shape[1] > 0 and max(stop_row - start_row, 0) * x.shape[0] >= SCREEN_MIN_PAIRS
                and _screen.exact_products())


def _upper_join(x: np.ndarray, start: int, stop: int, rows: int, cols: int,
                progress: Callable[[int], None] | None, tile: Callable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocked upper-triangle join of rows [start, stop) against rows [a, n): ``tile(a, b, c, d)`` gives the
    (i, j, score) of rows a..b-1 against c..d-1; the pairs of all tiles, ordered by i, then j."""
    n = x.shape[0]
    parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
    for a in range(start, stop, rows):
        b = min(a + rows, stop)
        parts += [tile(a, b, c, min(c + cols, n)) for c in range(a, n, cols)]
        if progress is not None:
            progress(b - a)
    i, j, s = (np.concatenate(column) for column in zip(*parts, strict=True))
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def _float_tile(x: np.ndarray, thr: np.float32, a: int, b: int, c: int, d: int,
                buffer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs at or above ``thr`` among rows a..b-1 against c..d-1 (j > i only: the tile may touch the
    diagonal), from float32 scores; the native scan takes 16 scores at a time (np.nonzero over the tile took
    0.39 of 1.66 s in a 20k community detection)."""
    scores = gemm.float_products(x[a:b], x[c:d], out=buffer)
    return kernels.threshold_pairs(scores, thr, row_offset=a, col_offset=c, upper=c < b)


def _screened_pairs(x: np.ndarray, threshold: float, start: int, stop: int, progress: Callable[[int], None] | None,
                    quantized: _screen.Quantized | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`upper_pairs` through the int8 screen: per tile, exact int32 products (ONNX Runtime), the native
    screen (:func:`embfast.kernels.screen_pairs`), then the candidates scored in float32 and kept at or above
    the threshold. A tile with too many candidates (:data:`SCREEN_MAX_SHARE`) is scored in float32 whole."""
    if quantized is not None:
        if quantized.qa.shape != x.shape:
            raise ValueError(f"quantized holds {quantized.qa.shape} rows, not those of x {x.shape}")
        q, base = quantized, 0
    else:  # the rows a part of the join reads: its own, and the columns after them
        q, base = _screen.Quantized(x[start:]), start
    thr = np.float32(threshold)
    buffer = np.empty(SCREEN_ROWS * SCREEN_COLS, np.int32)

    def tile(a: int, b: int, c: int, d: int):
        products = _screen.products(q, a - base, b - base, c - base, d - base, out=buffer)
        ci, cj = kernels.screen_pairs(products, q.row_terms(a - base, b - base, threshold),
                                      q.col_terms(c - base, d - base), row_offset=a, col_offset=c, upper=c < b)
        if len(ci) > SCREEN_MAX_SHARE * (b - a) * (d - c):
            return _float_tile(x, thr, a, b, c, d)
        s = np.einsum("ij,ij->i", x[ci], x[cj])
        keep = s >= thr
        return ci[keep], cj[keep], s[keep]

    return _upper_join(x, start, stop, SCREEN_ROWS, SCREEN_COLS, progress, tile)


def duplicate_groups(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Connected components (single linkage) of the pairs (i, j) over rows 0..n-1, with more than one row.

    Each group is sorted ascending (its first row is the one a deduplication keeps); groups are ordered by
    their first row. Uses scipy's ``connected_components``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0 or len(i) == 0:
        return []
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    counts = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    groups: dict[int, list[int]] = {}
    for row in order[counts[labels[order]] > 1].tolist():
        groups.setdefault(int(labels[row]), []).append(row)
    return sorted(groups.values(), key=lambda g: g[0])


def community_detection(vectors, threshold: float = 0.75, min_community_size: int = 10, *,
                        progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Fast Community Detection, as sentence-transformers' ``util.community_detection``.

    A row whose ``min_community_size`` nearest rows (itself included) all score at least ``threshold``
    seeds a candidate community: every row scoring at least ``threshold`` with it, by score descending
    (the seed, its central element, first). Candidates are taken largest first (stable), each keeping its
    rows not yet claimed, and kept if still at least ``min_community_size`` large; the result is sorted
    by size, largest first. The close pairs come from the blocked upper-triangle join
    (:func:`upper_pairs`: each pair scored once, never an (n, n) matrix); ties in score are ordered by
    row (sentence-transformers' torch.topk leaves them unspecified).

    Args:
        vectors: (n, dim) float embeddings (normalized here).
        threshold: cosine at or above which two rows are close (default 0.75).
        min_community_size: smallest community returned (default 10; at most n).
        progress: called with the rows done after each block.

    Returns:
        Communities as lists of row indices, largest first, each with its central element first.
    """
    threshold = _check_threshold(threshold)
    if threshold is None:
        raise ValueError("threshold must be a number in [-1, 1], got None")
    min_size = _check_int("min_community_size", min_community_size, 1)
    x = unit_rows(vectors)
    n = x.shape[0]
    if n == 0:
        return []
    min_size = min(min_size, n)
    i, j, s = upper_pairs(x, threshold, progress=progress)
    self_score = np.einsum("ij,ij->i", x, x)  # as the matmul would give it: ~1, a tie for exact duplicates
    keep_self = self_score >= np.float32(threshold)
    rows = np.concatenate([i, j, np.flatnonzero(keep_self)])
    cols = np.concatenate([j, i, np.flatnonzero(keep_self)])
    vals = np.concatenate([s, s, self_score[keep_self]])
    order = np.lexsort((cols, -vals, rows))  # by row, then score descending, then the lower row first
    rows, cols = rows[order], cols[order]
    counts = np.bincount(rows, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)])
    candidates = [cols[starts[r]:starts[r + 1]] for r in np.flatnonzero(counts >= min_size)]
    candidates.sort(key=len, reverse=True)  # stable: equal sizes keep row order, as sentence-transformers
    used = np.zeros(n, dtype=bool)
    out: list[np.ndarray] = []
    for community in candidates:
        free = community[~used[community]]
        if len(free) >= min_size:
            out.append(free)
            used[free] = True
    out.sort(key=len, reverse=True)
    return [c.tolist() for c in out]
