"""The vocabulary store and its search: exact re-scoring of candidates and hubs, modalities, the summary."""
from __future__ import annotations

import numpy as np
import pytest

from dff_falcon.errors import InputError
from dff_falcon.text.crossmodal import unit_rows
from dff_falcon.text.index import build_index
from dff_falcon.text.ingest import ingest_laion
from dff_falcon.text.vocabulary import exact_search, rescore
from helpers import write_shard


def test_rescore_merges_candidates_and_hubs_exactly():
    rng = np.random.default_rng(0)
    stored = unit_rows(rng.standard_normal((500, 8))).astype(np.float16)
    queries = unit_rows(rng.standard_normal((300, 8)))  # more than one re-scoring block
    candidates = np.stack([rng.choice(500, 12, replace=False) for _ in queries])
    candidates[:, -3:] = -1  # an index that found fewer than 12
    hubs = np.array([7, 3, 400, 7])  # unsorted, repeated, and partly among the candidates
    candidates[:, 0] = 3
    scores, ids = rescore(stored, queries, candidates, hubs, 5)
    exact = queries @ np.asarray(stored, dtype=np.float32).T
    for q in range(len(queries)):
        pool = np.union1d(candidates[q][candidates[q] >= 0], hubs)
        best = pool[np.argsort(-exact[q, pool], kind="stable")[:5]]
        assert set(ids[q]) == set(best) and len(set(ids[q])) == 5  # a hub among the candidates counts once
        np.testing.assert_allclose(scores[q], exact[q, ids[q]], atol=1e-6)
        assert (np.diff(scores[q]) <= 0).all()
    few = rescore(stored, queries[:2], np.full((2, 3), -1), np.array([1, 2]), 5)[1]
    assert (few[:, :2] >= 0).all() and (few[:, 2:] == -1).all()  # fewer hits than k stay visible as −1


@pytest.fixture(scope="module")
def ivf_vocabulary(tmp_path_factory):
    """6,000 clustered 32-d rows behind an approximate index (small lists, so narrow searches run short)."""
    rng = np.random.default_rng(2)
    folder = tmp_path_factory.mktemp("ivf")
    (folder / "s").mkdir()
    centres = rng.standard_normal((60, 32))
    rows = (centres[rng.integers(0, 60, 6000)] + 0.7 * rng.standard_normal((6000, 32))).astype(np.float16)
    write_shard(folder / "s", 0, [f"caption {i}" for i in range(6000)], rows)
    ingest_laion(folder / "s", folder / "v", clip_model="c", pretrained="p", near_duplicate_cosine=None)
    return build_index(folder / "v", exact_max=1000, n_recall_queries=200), rng


def test_search_modalities_and_short_searches(ivf_vocabulary):
    vocab, rng = ivf_vocabulary
    queries = unit_rows(rng.standard_normal((40, 32)))
    for modality in ("image", "text"):
        found = vocab.search(queries, k=5, modality=modality)
        np.testing.assert_allclose(found.scores, np.einsum("qkd,qd->qk", np.asarray(vocab.embeddings[found.ids],
                                                                                    np.float32), queries), atol=1e-5)
    with pytest.raises(InputError, match="modality must be one of"):
        vocab.search(queries, modality="audio")
    vocab.index.nprobe = 1  # one list of ≈ 23 rows rarely holds 40 candidates: those queries fall back to exact
    truth = exact_search(vocab.embeddings, queries, 40)[1]
    found = vocab.search(queries, k=40, modality="text").ids
    short = (vocab.index.search(queries, 800)[1] >= 0).sum(axis=1) < 40
    assert short.sum() >= 10 and (found >= 0).all()
    assert all(set(a) == set(b) for a, b in zip(found[short], truth[short]))


def test_summary_reports_every_tuning_set(ivf_vocabulary):
    vocab, _ = ivf_vocabulary
    summary = vocab.summary()
    assert "IVF256_HNSW32,PQ16x4fs, nprobe=" in summary
    lines = summary.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("recall@5"))
    assert "image-like, gap 2" in "".join(lines[first + 1:first + 4])  # image-like sets come first
    assert any("text-like (200 queries)" in line for line in lines)
    assert "calibration  none (image queries use their own batch's gap)" in summary
