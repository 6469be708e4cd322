"""Pooling, normalization and exact top-k kernels with one dispatching API.

Every function takes ``backend="auto" | "native" | "numba" | "reference"``:
``auto`` picks the compiled C++ core, then numba, then the NumPy reference
(:mod:`embfast.kernels.reference`, the executable spec). Asking for a backend
that is not installed raises ``RuntimeError``. With ``EMBFAST_REQUIRE_NATIVE=1``
in the environment, importing embfast fails if the C++ core did not load; without it a
missing core is one RuntimeWarning saying why and how to fix it. ``EMBFAST_ISA=generic``
(or :func:`set_isa`) forces the portable C++ path instead of AVX2+FMA; ``EMBFAST_ISA=avx2`` keeps these
kernels on AVX2+FMA and lowers the int8 operators of :mod:`embfast.ortops` from AVX-512 VNNI to AVX2.

Inputs are converted visibly, in one place (:func:`as_float32`): float64 or
non-contiguous arrays become C-contiguous float32 copies; the native core
itself never casts. ``threads``: 0 = all cores, 1 = serial.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import numpy as np

from embfast.kernels import reference

ISAS = ("auto", "generic", "avx2")


def _native_missing_message(exc: BaseException) -> str:
    """Why the compiled core did not load, and how to fix it, in plain words."""
    pkg = Path(__file__).resolve().parents[1]
    built = sorted(p.name for p in pkg.glob("_core*") if p.suffix in (".so", ".pyd"))
    checkout = (pkg.parent / "pyproject.toml").is_file() and (pkg.parent / "csrc").is_dir()
    if not built and checkout:
        return (f"embfast is imported from the source checkout {pkg}, which has no compiled core (embfast._core): "
                "the slower numba / NumPy kernels run instead. This checkout shadows the installed package "
                f"because Python runs from {pkg.parent}; run from another directory to use the installed one, "
                "or build the core in place with `pip install -e .`")
    if not built:
        return (f"embfast's compiled core (embfast._core) is missing from {pkg}: the slower numba / NumPy kernels "
                "run instead. Reinstall embfast so that its C++ core builds (pip install --force-reinstall "
                "--no-deps embfast, which needs a C++ compiler and cmake) and see `embfast info`")
    return (f"embfast's compiled core {built[0]} in {pkg} did not load ({type(exc).__name__}: {exc}): the slower "
            "numba / NumPy kernels run instead. Rebuild it for this Python and platform (pip install "
            "--force-reinstall --no-deps embfast, or `pip install -e .` in a checkout) and see `embfast info`")


# libgomp reads this once, at load: sleeping (not spinning) workers do not steal
# cycles from ONNX Runtime's own pool between kernel calls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    _core = importlib.import_module("embfast._core")
except ImportError as exc:
    NATIVE_ERROR: str | None = _native_missing_message(exc)
    if os.environ.get("EMBFAST_REQUIRE_NATIVE") == "1":
        raise ImportError(f"{NATIVE_ERROR}. EMBFAST_REQUIRE_NATIVE=1 forbids the fallback.") from exc
    _core = None
    warnings.warn(NATIVE_ERROR, RuntimeWarning, stacklevel=2)
else:
    NATIVE_ERROR = None


def set_isa(isa: str) -> None:
    """Choose the native kernels' code path: "auto" (the best this CPU runs: AVX2+FMA or generic), "generic",
    or "avx2" (the same as "auto" here: these kernels have no AVX-512 path).

    "generic" forces the portable C++ path on any CPU (for tests and for comparing paths). The
    environment variable ``EMBFAST_ISA`` sets it at import. Raises ValueError for another value and
    RuntimeError when the native core is not loaded.
    """
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    if _core is None:
        raise RuntimeError(f"set_isa needs the native core: {NATIVE_ERROR}")
    _core.set_force_generic(isa == "generic")


def isa() -> str:
    """The path native kernels run now: "avx2+fma" or "generic" ("none" without the native core)."""
    return "none" if _core is None else _core.isa()


_env_isa = os.environ.get("EMBFAST_ISA", "auto").strip().lower() or "auto"
if _env_isa not in ISAS:
    raise ImportError(f"EMBFAST_ISA must be one of {', '.join(ISAS)}, got {os.environ['EMBFAST_ISA']!r}")
if _core is not None:
    set_isa(_env_isa)

try:
    from embfast.kernels import _numba
except ImportError:  # numba is optional
    _numba = None

HAS_NATIVE = _core is not None
HAS_NUMBA = _numba is not None
BACKENDS = ("auto", "native", "numba", "reference")
POOLING_MODES = reference.POOLING_MODES
# From this many queries on, the float top-k computes score blocks with BLAS
# (numpy matmul) and merges them natively; below it, one streaming pass wins.
BLAS_MIN_QUERIES = 24
BLAS_BLOCK_ROWS = 16384

__all__ = [
    "BACKENDS", "HAS_NATIVE", "HAS_NUMBA", "ISAS", "POOLING_MODES", "as_float32", "cls_pool", "isa", "l2_normalize",
    "set_isa", "last_token_pool", "max_pool", "mean_pool", "pool", "pool_tokens", "screen_pairs", "threshold_pairs",
    "topk_cosine",
    "topk_hamming",
    "topk_int8", "QuantizedCorpus", "quantize", "topk_quantized",
]


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "native" if HAS_NATIVE else ("numba" if HAS_NUMBA else "reference")
    if backend == "native" and not HAS_NATIVE:
        raise RuntimeError(f"backend='native' asked for, but embfast._core did not load: {NATIVE_ERROR}")
    if backend == "numba" and not HAS_NUMBA:
        raise RuntimeError("backend='numba' asked for, but numba is not installed: pip install 'embfast[numba]'")
    return backend


def as_float32(x, name: str, ndim: int) -> np.ndarray:
    """The one place inputs are converted: C-contiguous float32 of the given ndim, or an error.

    Raises TypeError for non-numeric data and ValueError for a wrong ndim.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_mask(mask, x: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype.kind not in "iub":
        raise TypeError(f"mask must be an integer or bool array, got dtype {m.dtype}")
    if m.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape {x.shape[:2]} to match x {x.shape}, got {m.shape}")
    if m.dtype not in (np.int64, np.int32):
        m = m.astype(np.int64)
    return np.ascontiguousarray(m)


def pool(x, mask, mode: str = "mean", *, backend: str = "auto", threads: int = 0) -> np.ndarray:
    """Pool token vectors (batch, seq_len, hidden) with mask (batch, seq_len) to (batch, hidden) float32.

    ``mode``: mean | cls | max | lasttoken | mean_sqrt_len (see :func:`reference.pool` for the edge cases).
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"pool: mode must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
    x = as_float32(x, "x", 3)
    m = _as_mask(mask, x)
    b = _backend(backend)
    if b == "native":
        return _core.pool(x, m, mode, threads)
    if b == "numba":
        return _numba.pool(x, m, mode)
    return reference.pool(x, m, mode)


def pool_tokens(token_vecs: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pool (batch, seq_len, hidden) token vectors with a (batch, seq_len) mask, as sentence-transformers does.

    ``cls`` takes each row's first position whose mask is set (position 0 with
    right padding; the first real token with left padding or when prompt tokens
    were masked out), as sentence-transformers' Pooling does; every other mode is
    :func:`pool`. Returns (batch, hidden) float32.
    """
    if mode == "cls":
        first = np.asarray(mask).argmax(axis=1)
        if first.any():
            x = np.asarray(token_vecs)
            return np.ascontiguousarray(x[np.arange(x.shape[0]), first], dtype=np.float32)
    return pool(token_vecs, mask, mode)


def mean_pool(x, mask, *, backend: str = "auto", threads: int = 0) -> np.ndarray:
    """Masked mean: sum / max(count, 1e-9); an all-padding row gives zeros. (batch, hidden)."""
    return pool(x, mask, "mean", backend=backend, threads=threads)


def cls_pool(x, mask, *, backend: str = "auto", threads: int = 0) -> np.ndarray:
    """The first token of every row, whatever the mask. (batch, hidden)."""
    return pool(x, mask, "cls", backend=backend, threads=threads)


def max_pool(x, mask, *, backend: str = "auto", threads: int = 0) -> np.ndarray:
    """Element-wise max over real tokens; an all-padding row gives zeros. (batch, hidden)."""
    return pool(x, mask, "max", backend=backend, threads=threads)


def last_token_pool(x, mask, padding_side: str = "right", *, backend: str = "auto", threads: int = 0) -> np.ndarray:
    """The last real token of each row (right or left padding); all-padding gives zeros. (batch, hidden).

    The kernel finds the last nonzero mask position, which is right for both
    padding sides; ``padding_side`` is validated for clarity of the call site.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    return pool(x, mask, "lasttoken", backend=backend, threads=threads)


def l2_normalize(x, *, backend: str = "auto", threads: int = 0) -> np.ndarray:
    """Rows divided by max(||row||, 1e-12); zero rows stay zero. (rows, dim) -> new (rows, dim) float32."""
    x = as_float32(x, "x", 2)
    b = _backend(backend)
    if b == "native":
        return _core.l2_normalize(x, threads)
    if b == "numba":
        return _numba.l2_normalize(x)
    return reference.l2_normalize(x)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return int(k)


def _check_pair(queries: np.ndarray, corpus: np.ndarray) -> None:
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} (shape {queries.shape}) but the corpus has dim "
                         f"{corpus.shape[1]} (shape {corpus.shape})")


def _inv_norms(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return (1.0 / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def _topk_blas(q: np.ndarray, c: np.ndarray, k: int, assume_normalized: bool, threads: int):
    """Many queries: BLAS score blocks (numpy matmul releases the GIL) merged by the native heap kernel."""
    nq, n = q.shape[0], c.shape[0]
    heap_s = np.empty((nq, k), dtype=np.float32)
    heap_i = np.empty((nq, k), dtype=np.int64)
    heap_n = np.zeros(nq, dtype=np.int64)
    row_scale = None if assume_normalized else _inv_norms(q)
    scores = np.empty((nq, min(BLAS_BLOCK_ROWS, n)), dtype=np.float32)
    for start in range(0, n, BLAS_BLOCK_ROWS):
        block = c[start:start + BLAS_BLOCK_ROWS]
        out = scores[:, : block.shape[0]]
        np.matmul(q, block.T, out=out)
        col_scale = None if assume_normalized else _inv_norms(block)
        _core.topk_merge_block(np.ascontiguousarray(out), start, row_scale, col_scale, heap_s, heap_i, heap_n,
                               threads)
    _core.topk_finalize(heap_s, heap_i, heap_n)
    return heap_s, heap_i


def topk_cosine(queries, corpus, k: int, *, assume_normalized: bool = False, threads: int = 0,
                backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine similarity.

    Args:
        queries: (q, dim) float array.
        corpus: (n, dim) float array.
        k: results per query; ``k > n`` clamps to n, ``k = 0`` gives (q, 0).
        assume_normalized: rows are unit length, so score = inner product (skips the norms).
        threads: 0 = all cores, 1 = serial.

    Returns:
        scores (q, min(k, n)) float32 best first, indices (q, min(k, n)) int64.
        Ties go to the lower corpus index. NaN scores (a NaN query or corpus row)
        are never returned: such slots hold index -1 and score NaN.
    """
    k = _check_k(k)
    q = as_float32(queries, "queries", 2)
    c = as_float32(corpus, "corpus", 2)
    _check_pair(q, c)
    b = _backend(backend)
    if b == "reference":
        return reference.topk_cosine(q, c, k, assume_normalized=assume_normalized)
    if b == "numba":
        return _numba.topk_cosine(q, c, k, assume_normalized)
    kk = min(k, c.shape[0])
    if q.shape[0] >= BLAS_MIN_QUERIES and kk > 0 and c.shape[0] > 0:
        return _topk_blas(q, c, kk, assume_normalized, threads)
    qscale = np.ones(q.shape[0], dtype=np.float32) if assume_normalized else _inv_norms(q)
    return _core.topk_scan(q, qscale, c, k, not assume_normalized, threads)


def threshold_pairs(scores, threshold: float, *, row_offset: int = 0, col_offset: int = 0, upper: bool = False,
                    threads: int = 0, backend: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every score >= ``threshold`` of a (rows, cols) tile: (i, j, score) with i = row_offset + r, j = col_offset + c,
    in row order (columns increasing within a row); ``upper``: only j > i (the upper triangle of a self-join).
    int64, int64, float32 arrays. The native kernel skips 16 scores at a time below the threshold, rows split
    across ``threads``; the spec is :func:`reference.threshold_pairs` (np.nonzero), which the numba and reference
    backends both run (NumPy is already vectorized here)."""
    x = as_float32(scores, "scores", 2)
    if _backend(backend) == "native":
        return _core.threshold_pairs(x, float(threshold), int(row_offset), int(col_offset), bool(upper), threads)
    return reference.threshold_pairs(x, threshold, row_offset, col_offset, upper)


def screen_pairs(q, row_terms, col_terms, *, row_offset: int = 0, col_offset: int = 0, upper: bool = False,
                 threads: int = 0, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The int8 screen of a threshold self-join (:mod:`embfast.screen`): (i, j) of every entry of the int32 tile
    ``q`` (rows, cols) of exact quantized products with ``q * sb + (r1 * eb + r2 * nb) >= rt``, ``row_terms`` =
    (r1, r2, rt) float32 (3, rows), ``col_terms`` = (sb, eb, nb) float32 (3, cols); global indices row_offset + r,
    col_offset + c, in row order; ``upper``: only j > i. int64 arrays. The spec is :func:`reference.screen_pairs`;
    the native kernel skips 16 entries at a time, rows split across ``threads``.

    Raises:
        TypeError: ``q`` not int32. ValueError: wrong shapes."""
    qa = np.asarray(q)
    if qa.dtype != np.int32:
        raise TypeError(f"q must be int32, got dtype {qa.dtype}")
    if qa.ndim != 2:
        raise ValueError(f"q must be 2-D, got shape {qa.shape}")
    qa = np.ascontiguousarray(qa)
    rows, cols = as_float32(row_terms, "row_terms", 2), as_float32(col_terms, "col_terms", 2)
    if rows.shape != (3, qa.shape[0]) or cols.shape != (3, qa.shape[1]):
        raise ValueError(f"row_terms must be (3, {qa.shape[0]}) and col_terms (3, {qa.shape[1]}), got "
                         f"{rows.shape} and {cols.shape}")
    if _backend(backend) == "native":
        return _core.screen_pairs(qa, rows, cols, int(row_offset), int(col_offset), bool(upper), threads)
    return reference.screen_pairs(qa, rows, cols, row_offset, col_offset, upper)


def _quantized_pair(queries, corpus, dtype, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a quantized (queries, corpus) pair of ``dtype``; returns them C-contiguous."""
    q, c = np.asarray(queries), np.asarray(corpus)
    for name, a in (("queries", q), ("corpus", c)):
        if a.dtype != dtype:
            raise TypeError(f"{name} must be {what}, got dtype {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    _check_pair(q, c)
    return np.ascontiguousarray(q), np.ascontiguousarray(c)


def topk_int8(queries, corpus, k: int, *, threads: int = 0, backend: str = "auto"):
    """Top-k by exact integer dot product of int8 vectors (q, dim) x (n, dim); scores float32."""
    k = _check_k(k)
    q, c = _quantized_pair(queries, corpus, np.int8, "int8")
    b = _backend(backend)
    if b == "reference":
        return reference.topk_int8(q, c, k)
    if b == "numba":
        return _numba.topk_int8(q, c, k)
    return _core.topk_int8(q, c, k, threads)


def topk_hamming(queries, corpus, k: int, *, threads: int = 0, backend: str = "auto"):
    """Top-k over packed bits (uint8 (q, bytes) x (n, bytes)); score = bits - Hamming distance."""
    k = _check_k(k)
    q, c = _quantized_pair(queries, corpus, np.uint8, "packed uint8 bits")
    b = _backend(backend)
    if b == "reference":
        return reference.topk_hamming(q, c, k)
    if b == "numba":
        return _numba.topk_hamming(q, c, k)
    return _core.topk_hamming(q, c, k, threads)


from embfast.kernels.quantized import QuantizedCorpus, quantize, topk_quantized  # noqa: E402


def build_info() -> dict:
    """What the native core was built with, and which SIMD path runs."""
    if not HAS_NATIVE:
        return {"native": False, "native_error": NATIVE_ERROR, "isa": "none", "openmp": False}
    return {"native": True, "native_version": _core.__version__, "isa": _core.isa(), "openmp": _core.HAS_OPENMP,
            "compiler": _core.COMPILER, "build_type": _core.BUILD_TYPE, "max_threads": _core.max_threads()}
