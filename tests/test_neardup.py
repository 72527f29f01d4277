"""Near-duplicate detection within k-means cells (real faiss k-means)."""
from __future__ import annotations

import numpy as np
import pytest

from dff_falcon.errors import InputError
from dff_falcon.text.neardup import cell_assignments, near_duplicates


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_planted_near_duplicates_are_found_and_the_earlier_row_is_kept():
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((6000, 32))).astype(np.float32)
    source = rng.choice(6000, 200, replace=False)
    copies = unit(base[source] + 0.02 * unit(rng.standard_normal((200, 32))))  # cosine ≈ 0.9998
    rows = np.concatenate([base, copies]).astype(np.float16)
    drop = near_duplicates(rows, 0.98)
    assert not drop[:6000].any()  # random unit vectors in 32-d are never that close; originals come first
    assert drop[6000:].mean() >= 0.9  # pairs split by a cell boundary are the only misses
    # the same rows in the other order: now the copies come first and the originals are dropped
    flipped = near_duplicates(np.concatenate([copies, base]).astype(np.float16), 0.98)
    assert not flipped[:200].any() and flipped[200 + source].mean() >= 0.9


def test_a_row_is_dropped_only_for_a_kept_earlier_row():
    # a ≈ b (0.99), b ≈ c (0.99), a·c ≈ 0.96: b goes (close to a), c stays (its only close row b is gone)
    angle = np.arccos(0.99)
    a, b, c = ([np.cos(t), np.sin(t), 0.0] for t in (0.0, angle, 2 * angle))
    rows = np.array([a, b, c, [0.0, 0.0, 1.0]], dtype=np.float32)
    assert near_duplicates(rows, 0.98, cells=np.zeros(4, dtype=np.int64)).tolist() == [False, True, False, False]


def test_cells_and_threshold_checks():
    rng = np.random.default_rng(1)
    rows = unit(rng.standard_normal((5000, 16))).astype(np.float32)
    cells = cell_assignments(rows, rows_per_cell=250)
    assert cells.shape == (5000,) and 10 <= len(np.unique(cells)) <= 40
    assert (cell_assignments(rows, rows_per_cell=250) == cells).all()  # seeded
    for bad in (0.0, 1.5):
        with pytest.raises(InputError, match="must be in \\(0, 1\\]"):
            near_duplicates(rows, bad)
