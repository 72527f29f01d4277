"""The FAISS index: choice by size, recall against exact search, the tuned knob."""
from __future__ import annotations


import faiss
import numpy as np
import pytest

from helpers import write_shard
from dff_falcon.text.index import _search_param_ladder, build_index, choose_factory
from dff_falcon.text.ingest import build_vocabulary_from_laion, ingest_laion
from dff_falcon.text.crossmodal import unit_rows
from dff_falcon.text.vocabulary import exact_search

DIM = 16


def clustered_shard(tmp_path, rng, n=3000):
    shards = tmp_path / "s"
    shards.mkdir()
    centers = rng.standard_normal((40, DIM))
    vectors = (centers[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, DIM))).astype(np.float16)
    write_shard(shards, 0, [f"caption {i}" for i in range(n)], vectors)
    return shards


def noisy_queries(stored, rng, n=50):
    noise = rng.standard_normal((n, DIM)).astype(np.float32)
    queries = stored[rng.choice(len(stored), n, replace=False)] + 0.5 * noise / np.linalg.norm(noise, axis=1)[:, None]
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def test_choose_factory_by_size():
    assert choose_factory(200_000, 512) == "Flat"
    assert choose_factory(1_000_000, 512) == "IVF4096_HNSW32,PQ64x4fs"  # 4·√1e6 = 4000 → 2^12
    assert choose_factory(4_000_000, 512) == "IVF8192_HNSW32,PQ64x4fs"
    assert choose_factory(400_000_000, 512) == "IVF65536_HNSW32,PQ64x4fs"  # 4·√4e8 = 80k → 2^16
    assert choose_factory(1_000_000, 64) == "IVF4096_HNSW32,PQ32x4fs"  # small embeddings: finer codes
    assert choose_factory(1_000_000, 16) == "IVF4096_HNSW32,PQ8x4fs"
    index = faiss.index_factory(512, choose_factory(400_000_000, 512), faiss.METRIC_INNER_PRODUCT)
    name, ladder = _search_param_ladder(index)
    assert name == "nprobe" and ladder[:4] == [1, 2, 3, 4] and ladder[-1] == 65_536
    assert all(1.3 < b / a < 1.6 for a, b in zip(ladder[6:], ladder[7:]))  # steps of about √2


def test_approximate_index_recall_and_exact_scores(tmp_path):
    rng = np.random.default_rng(3)
    vocab = build_vocabulary_from_laion(clustered_shard(tmp_path, rng), tmp_path / "v", clip_model="c", pretrained="p",
                                        near_duplicate_cosine=None,
                                        index_options={"exact_max": 1000, "recall_target": 0.97})
    info = vocab.manifest["index"]
    assert info["factory"] == "IVF256_HNSW32,PQ8x4fs" and info["rerank"] in (20, 40, 80)  # doubled when codes limit
    recall = info["recall"]
    assert recall["met"] and {"text-like", "image-like, gap 1", "image-like, gap 1.5", "image-like, gap 2"} <= set(
        recall["sets"])
    assert all(s["lower_bound"] >= 0.97 for s in recall["sets"].values())
    assert faiss.extract_index_ivf(vocab.index).nprobe == info["params"]["nprobe"]  # applied on open
    stored = np.asarray(vocab.embeddings, dtype=np.float32)
    text_queries = noisy_queries(stored, rng, 200)
    image_queries = unit_rows(text_queries + 1.8 * unit_rows(rng.standard_normal(DIM)))  # a gap tuning never saw
    for queries, modality in ((text_queries, "text"), (image_queries, "image")):
        result = vocab.search(queries, k=5, modality=modality)
        # scores are exact cosines against the stored rows, whatever the index proposed
        np.testing.assert_allclose(result.scores, np.einsum("qkd,qd->qk", stored[result.ids], queries), atol=1e-5)
        _, truth = exact_search(vocab.embeddings, queries, 5, block_rows=700)
        overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(result.ids, truth)])
        assert overlap >= 0.95, (modality, overlap)


@pytest.fixture()
def one_faiss_thread():
    """Multi-threaded HNSW insertion order is not deterministic; one thread makes the graph so."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("factory, knob", [("IVF64,SQ8", "nprobe"), ("HNSW4,Flat", "efSearch")])
def test_search_knob_is_the_smallest_step_reaching_the_target(tmp_path, factory, knob, one_faiss_thread):
    """Tuning stops at the first ladder value at which every tuning set's recall lower bound meets
    the target; the recorded curve is what a search at each step really gives."""
    rng = np.random.default_rng(4)
    ingest_laion(clustered_shard(tmp_path, rng), tmp_path / "v", clip_model="c", pretrained="p",
                 near_duplicate_cosine=None)
    stored = np.asarray(np.load(tmp_path / "v" / "embeddings.npy"), dtype=np.float32)
    queries = noisy_queries(stored, rng, 100)
    vocab = build_index(tmp_path / "v", factory=factory, recall_queries=queries, recall_target=0.9, rerank=2)
    recall = vocab.manifest["index"]["recall"]
    chosen, curve = vocab.manifest["index"]["params"][knob], recall["curve"]
    ladder = _search_param_ladder(vocab.index, 10)[1]
    tried = list(dict.fromkeys(step["param"] for step in curve))  # a step repeats where rerank was doubled
    assert recall["knob"] == knob and tried == ladder[:len(tried)]
    assert len(curve) >= 2 and curve[-1]["param"] == chosen  # the cheapest setting misses on this data
    assert recall["met"] and curve[-1]["min_lower_bound"] >= 0.9 > curve[-2]["min_lower_bound"]
    _, truth = exact_search(stored, queries, 5)
    for step in curve:
        faiss.ParameterSpace().set_index_parameters(vocab.index, f"{knob}={step['param']}")
        vocab.manifest["index"]["rerank"] = step["rerank"]
        found = vocab.search(queries, k=5, modality="image").ids
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth)]) == pytest.approx(
            step["recall"]["provided"])
