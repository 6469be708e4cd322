from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embfast.batching import plan_batches


@given(lengths=st.lists(st.integers(1, 300), max_size=200), batch_size=st.integers(1, 64),
       budget=st.one_of(st.none(), st.integers(1, 5000)))
def test_every_text_once_and_budget_respected(lengths, batch_size, budget):
    batches = plan_batches(np.array(lengths, dtype=np.int64), batch_size, budget)
    flat = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        padded = len(b) * max(lengths[i] for i in b)
        assert budget is None or padded <= budget or len(b) == 1


def test_longest_first_and_errors():
    batches = plan_batches(np.array([3, 10, 5, 10]), 2)
    assert [b.tolist() for b in batches] == [[1, 3], [2, 0]]
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(np.array([1]), 0)
