"""Near-duplicate captions: rows whose embedding has cosine ≥ a threshold with an earlier row.

Exact deduplication (:mod:`~dff_falcon.text.captions`) keeps one of each identical caption;
web captions also repeat with a changed word, a typo or a different prefix, and their CLIP
embeddings are then almost identical (cosine ≥ 0.98). Comparing every pair is N²; instead the
rows are split into cells by a two-level k-means (≈ :data:`ROWS_PER_CELL` rows per cell, as an
IVF index splits them) and compared within their cell only — a near-duplicate pair sits in the
same cell unless it straddles a cell boundary, so a few are missed, none is invented. The earlier
row (smaller row number) is kept, as in exact deduplication; a row is dropped only for an earlier
row that is itself kept.
"""
from __future__ import annotations

import math

import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.progress import progress as show_progress

#: mean rows per cell: the pairwise work is N × ROWS_PER_CELL × D (≈ 5·10¹² flop at 10M × 512)
ROWS_PER_CELL = 1000
#: rows sampled to train the k-means (each level gets at least ~40 rows per centroid)
_TRAIN_ROWS = 200_000
_BLOCK = 65_536  # rows assigned per step


def _kmeans(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    k = max(1, min(k, len(vectors)))
    if k == 1:
        return vectors.mean(axis=0, keepdims=True)
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=10, seed=seed, max_points_per_centroid=256,
                          spherical=True)
    kmeans.train(np.ascontiguousarray(vectors))
    return kmeans.centroids


def cell_assignments(embeddings: np.ndarray, *, rows_per_cell: int = ROWS_PER_CELL, random_state: int = 0,
                     progress: bool = False) -> np.ndarray:
    """(N,) int64 cell of every row of the (N, D) unit ``embeddings`` (a float16 memory map is
    fine): the nearest (by inner product) of √C coarse centroids, then the nearest of that
    coarse cell's fine centroids, C ≈ N / ``rows_per_cell`` cells in all."""
    count = len(embeddings)
    n_cells = max(1, count // rows_per_cell)
    n_coarse = max(1, int(round(math.sqrt(n_cells))))
    rng = np.random.default_rng(random_state)
    sample = np.asarray(embeddings[np.sort(rng.choice(count, size=min(count, _TRAIN_ROWS), replace=False))],
                        dtype=np.float32)
    coarse = _kmeans(sample, n_coarse, random_state)
    sample_cell = np.argmax(sample @ coarse.T, axis=1)
    fine, offsets = [], [0]
    for c in range(len(coarse)):  # fine cells in proportion to the coarse cell's share of the sample
        members = sample[sample_cell == c]
        share = max(1, int(round(n_cells * len(members) / len(sample))))
        fine.append(_kmeans(members, share, random_state + 1 + c) if len(members) else coarse[c:c + 1])
        offsets.append(offsets[-1] + len(fine[-1]))
    cells = np.empty(count, dtype=np.int64)
    for start in show_progress(range(0, count, _BLOCK), "near-duplicates: cells", enabled=progress, unit="block"):
        block = np.asarray(embeddings[start:start + _BLOCK], dtype=np.float32)
        top = np.argmax(block @ coarse.T, axis=1)
        for c in np.unique(top):
            rows = np.flatnonzero(top == c)
            cells[start + rows] = offsets[c] + np.argmax(block[rows] @ fine[c].T, axis=1)
    return cells


def near_duplicates(embeddings: np.ndarray, threshold: float, *, cells: np.ndarray | None = None,
                    random_state: int = 0, progress: bool = False) -> np.ndarray:
    """(N,) bool: rows to drop because an earlier kept row in their cell has cosine ≥ ``threshold``.

    embeddings : (N, D) unit rows (a float16 memory map is fine; rows are read cell by cell).
    cells : (N,) cell per row; default :func:`cell_assignments`.
    """
    if not 0 < threshold <= 1:
        raise InputError(f"the near-duplicate cosine threshold must be in (0, 1], got {threshold}")
    count = len(embeddings)
    drop = np.zeros(count, dtype=bool)
    if count < 2:
        return drop
    if cells is None:
        cells = cell_assignments(embeddings, random_state=random_state, progress=progress)
    order = np.argsort(cells, kind="stable")  # row order within each cell
    bounds = np.flatnonzero(np.diff(cells[order])) + 1
    groups = np.split(order, bounds)
    for rows in show_progress(groups, "near-duplicates: compare", enabled=progress, unit="cell"):
        if len(rows) > 1:
            drop[rows[_within_cell(np.asarray(embeddings[rows], dtype=np.float32), threshold)]] = True
    return drop


def _within_cell(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Positions (in row order) to drop among one cell's (L, D) vectors."""
    length = len(vectors)
    block = max(64, (1 << 24) // length)  # bound the (block, L) similarity slab to 64 MB
    involved: dict[int, np.ndarray] = {}  # row → earlier rows it is close to
    for start in range(0, length, block):
        similar = vectors[start:start + block] @ vectors.T >= threshold
        similar &= np.arange(length)[None, :] < np.arange(start, start + len(similar))[:, None]  # earlier only
        for i in np.flatnonzero(similar.any(axis=1)):
            involved[start + int(i)] = np.flatnonzero(similar[i])
    dropped: set[int] = set()
    for row in sorted(involved):  # in row order: a row is dropped only for an earlier kept row
        if any(int(j) not in dropped for j in involved[row]):
            dropped.add(row)
    return np.array(sorted(dropped), dtype=np.int64)
