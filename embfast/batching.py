"""Offline batching: one length sort over a whole encode call, batches capped by count and padded tokens.

Sorting the whole call (not each chunk) keeps similar lengths together, so
padding is small; the token budget counts padding (rows x longest row), as
TEI's batcher does.
"""

from __future__ import annotations

import numpy as np


def plan_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """Split texts into batches of similar length.

    Args:
        lengths: (n,) tokens per text.
        batch_size: at most this many texts per batch (>= 1).
        max_batch_tokens: at most this many padded tokens (rows x longest row)
            per batch; None = no token cap. A single text longer than the
            budget still gets a batch of its own.

    Returns:
        A list of index arrays into ``lengths``; longest texts first; every
        index appears exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = order.size
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        size = batch_size
        if max_batch_tokens is not None:
            size = max(1, min(size, max_batch_tokens // longest))
        batches.append(order[start:start + size])
        start += size
    return batches
