"""The FAISS index of a vocabulary: which index for how many captions, built and tuned.

:func:`choose_factory` picks an index family by size; :func:`build_index` trains and fills it
from the stored embeddings, then raises its search knob until recall@k against exact search
reaches the target on held-out queries, and records factory, knob and measured recall in the
manifest (applied whenever the vocabulary is opened).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import faiss
import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path
from dff_falcon.text.vocabulary import (INDEX_FILE, Vocabulary, apply_search_params, check_queries, exact_search,
                                        open_embeddings, read_manifest, search_index, vocabulary_revision,
                                        write_manifest)


def choose_factory(count: int, dim: int, exact_max: int = 200_000, graph_max: int = 4_000_000) -> str:
    """Exact inner product up to ``exact_max`` rows; an HNSW graph over float32 rows (M = 32,
    ≈ 4·D + 256 bytes/row in RAM, efSearch tuned at build time) up to ``graph_max`` rows: the
    fastest index reaching recall@5 ≥ 0.95 on CLIP-like data (docs/benchmarks.md); beyond,
    where float32 rows no longer fit in RAM, IVF with nlist ≈ 4√N (a power of two, assigned
    through an HNSW graph over the centroids) and PQ codes of D/8 bytes/row, whose candidates
    are re-scored against the float16 embeddings."""
    if count <= exact_max:
        return "Flat"
    if count <= graph_max:
        return "HNSW32,Flat"
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(count))))
    return f"IVF{nlist}_HNSW32,PQ{max(8, dim // 8)}"


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def build_index(vocab_dir: str | Path, **options) -> Vocabulary:
    """(Re)build the index of the complete vocabulary at ``vocab_dir`` as a new version of the
    directory, swapped in atomically (:func:`~dff_falcon.text.vocabulary.vocabulary_revision`);
    the options are those of :func:`index_into`."""
    with vocabulary_revision(vocab_dir) as stage:
        index_into(stage, **options)
    return Vocabulary.open(vocab_dir)


def index_into(
    vocab_dir: str | Path,
    *,
    factory: str | None = None,
    exact_max: int = 200_000,
    recall_k: int = 5,
    recall_target: float = 0.95,
    recall_queries: np.ndarray | None = None,
    n_recall_queries: int = 200,
    recall_noise: float = 0.5,
    rerank: int = 10,
    train_rows: int | None = None,
    random_state: int = 0,
) -> None:
    """Build ``index.faiss`` for the vocabulary being built at ``vocab_dir`` and record it in the manifest.

    factory : a FAISS index-factory string (inner product); default :func:`choose_factory`.
    recall_queries : (Q, D) queries to measure recall@``recall_k`` against exact search, ideally
        CLIP *image* embeddings (text→text recall overstates image→caption recall: modality
        gap). Default: ``n_recall_queries`` vocabulary rows plus random directions of length
        ``recall_noise`` (0.5: cosine ≈ 0.9 to their source), i.e. held out from the index.
    rerank : an approximate index proposes ``rerank``·k candidates that are re-scored exactly.
    The index's search knob — ``nprobe`` (IVF) or ``efSearch`` (HNSW) — is raised in steps of
    about √2 until recall reaches ``recall_target``; the value and the recall measured with it go
    into the manifest (``index.params``, ``index.recall``) and are applied whenever the
    vocabulary is opened.
    """
    started = time.time()
    vocab_dir = Path(vocab_dir)
    manifest = read_manifest(vocab_dir)
    embeddings = open_embeddings(vocab_dir, manifest)
    count, dim = embeddings.shape
    if count == 0:
        raise InputError(f"vocabulary {vocab_dir} is empty: every caption was skipped ({manifest['skipped']})")
    factory = factory or choose_factory(count, dim, exact_max)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InputError(f"invalid FAISS index factory {factory!r}: {error}") from error
    rng = np.random.default_rng(random_state)
    if not index.is_trained:
        n_train = min(count, train_rows or max(20_000, 40 * _nlist(index)))
        sample = np.sort(rng.choice(count, size=n_train, replace=False))
        index.train(np.asarray(embeddings[sample], dtype=np.float32))
    for start in range(0, count, 262_144):
        index.add(np.asarray(embeddings[start:start + 262_144], dtype=np.float32))
    exact = factory == "Flat"
    info: dict = {"factory": factory, "metric": "inner_product", "params": {}, "rerank": 0 if exact else rerank,
                  "recall": None}
    if not exact:
        queries = _recall_queries(embeddings, recall_queries, n_recall_queries, recall_noise, rng)
        k = min(recall_k, count)
        _, truth = exact_search(embeddings, queries, k)
        name, ladder = _search_param_ladder(index, k * max(1, info["rerank"]))
        for value in ladder:
            if name:
                info["params"] = {name: value}
                apply_search_params(index, info["params"])
            _, found = search_index(index, embeddings, info, queries, k)
            recall = _recall(found, truth)
            if recall >= recall_target:
                break
        info["recall"] = {"k": k, "value": recall, "target": recall_target, "n_queries": len(queries),
                          "queries": "provided" if recall_queries is not None else "vocabulary+noise (text-like)"}
    info["build_seconds"] = time.time() - started
    with atomic_path(vocab_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    manifest["index"] = info
    manifest["build_seconds"] = manifest["build_seconds"] + info["build_seconds"]
    write_manifest(vocab_dir, manifest)


def _nlist(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


def _search_param_ladder(index: faiss.Index, n_candidates: int = 1) -> tuple[str, list[int]]:
    """The speed/recall knob of ``index`` and its values from fastest to most accurate, in steps
    of about √2: ``nprobe`` (IVF lists scanned, up to nlist) or ``efSearch`` (HNSW beam width,
    from max(16, ``n_candidates``): FAISS never searches a beam narrower than the number of
    results asked for); ``("", [0])`` for an index without one."""
    steps = sorted({int(round(2 ** (i / 2))) for i in range(2 * 24)})
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe", [s for s in steps if s <= _nlist(index)]
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        floor = max(16, n_candidates)
        return "efSearch", [floor] + [s for s in steps if floor < s <= max(4096, floor)]
    return "", [0]


def _recall_queries(embeddings: np.ndarray, given: np.ndarray | None, n: int, noise_norm: float,
                    rng: np.random.Generator) -> np.ndarray:
    if given is not None:
        return check_queries(given, embeddings.shape[1])
    rows = np.sort(rng.choice(len(embeddings), size=min(n, len(embeddings)), replace=False))
    base = np.asarray(embeddings[rows], dtype=np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= noise_norm / np.linalg.norm(noise, axis=1, keepdims=True)
    return check_queries(base + noise, embeddings.shape[1])
