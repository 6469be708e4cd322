"""Output-embedding quantization with sentence-transformers' semantics (``quantize_embeddings``).

- ``float32``: unchanged.
- ``int8`` / ``uint8``: per-dimension calibration ranges [min, max] (from
  ``ranges``, else from ``calibration_embeddings``, else from the embeddings
  themselves); 256 levels floor((x - min) / step) clipped to [0, 255];
  uint8 = level, int8 = level - 128. Empty embeddings with no ranges give an empty
  array of that dtype (as sentence-transformers).
- ``ubinary``: bits of x > 0 packed 8 per byte (numpy.packbits order), uint8.
- ``binary``: the same bytes minus 128, as int8.
"""

from __future__ import annotations

import numpy as np

from embfast.kernels import reference

OUTPUT_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def calibration_ranges(embeddings: np.ndarray) -> np.ndarray:
    """(2, dim) float32: per-dimension minimum (row 0) and maximum (row 1)."""
    return reference.int8_ranges(embeddings)


def quantize_embeddings(embeddings: np.ndarray, precision: str, *, ranges: np.ndarray | None = None,
                        calibration_embeddings: np.ndarray | None = None) -> np.ndarray:
    """Quantize (n, dim) float embeddings; see the module docstring for each precision."""
    if precision not in OUTPUT_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(OUTPUT_PRECISIONS)}, got {precision!r}")
    emb = np.asarray(embeddings, dtype=np.float32)
    if precision == "float32":
        return emb
    if precision in ("binary", "ubinary"):
        return reference.quantize_binary(emb, signed=precision == "binary")
    if ranges is None:
        source = emb if calibration_embeddings is None else np.asarray(calibration_embeddings, dtype=np.float32)
        if source.shape[0] == 0:
            if emb.shape[0] == 0:  # nothing to quantize: an empty result of the right type and width
                return np.zeros(emb.shape, dtype=np.int8 if precision == "int8" else np.uint8)
            raise ValueError("int8/uint8 quantization needs ranges or calibration embeddings; got none")
        ranges = calibration_ranges(source)
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, emb.shape[-1]):
        raise ValueError(f"ranges must have shape (2, {emb.shape[-1]}), got {ranges.shape}")
    if precision == "int8":
        return reference.quantize_int8(emb, ranges)
    return reference.quantize_levels(emb, ranges).astype(np.uint8)
