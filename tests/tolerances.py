"""Comparisons that hold on any x86-64 CPU: what float noise may change, and nothing else.

Two correct engines (ONNX Runtime and torch, AVX2 and generic kernels, 1 or 2 threads) agree on a float
to rounding, not bit for bit; so two rankings may swap neighbours whose scores tie within that rounding.
"""

from __future__ import annotations

import numpy as np


def assert_same_ranking(ids, scores, ref_ids, ref_scores, *, atol: float = 1e-5) -> None:
    """Equal top-k lists up to float noise: scores agree within ``atol`` position by position, and where
    the ids differ, the reference's score there ties (within ``atol``) with another reference position
    holding the id we returned, or with the score just outside the list (a tie at the cut)."""
    ids, ref_ids = list(ids), list(ref_ids)
    scores, ref_scores = np.asarray(scores, np.float64), np.asarray(ref_scores, np.float64)
    assert len(ids) == len(ref_ids), (ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=atol)
    for pos, (a, b) in enumerate(zip(ids, ref_ids, strict=True)):
        if a == b:
            continue
        if a in ref_ids:  # a swap inside the list: both positions must tie
            assert abs(ref_scores[ref_ids.index(a)] - ref_scores[pos]) <= 2 * atol, (pos, ids, ref_ids, ref_scores)
        else:  # a different row at the cut: its score must tie with the reference's last
            assert abs(scores[pos] - ref_scores[-1]) <= 2 * atol, (pos, ids, ref_ids, scores, ref_scores)
