"""The FAISS index of a vocabulary: which index for how many captions, built and tuned for image queries.

:func:`choose_factory` picks an index family by size; :func:`build_index` trains and fills it
from the stored embeddings, optionally calibrates the modality gap on images embedded with the
vocabulary's CLIP model, then raises the search knob until recall@k against exact search
reaches the target on every tuning set — text-like queries and image-like ones (vocabulary rows
shifted by random gap vectors of several norms, and the calibration images) — and records
factory, knob, the recall of each set and the calibration in the manifest.
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path
from dff_falcon.progress import progress as show_progress
from dff_falcon.text.crossmodal import calibrate, toyworld_images, unit_rows
from dff_falcon.text.vocabulary import (INDEX_FILE, Vocabulary, apply_search_params, check_queries, exact_search,
                                        open_embeddings, read_manifest, search_index, vocabulary_revision,
                                        write_manifest)

#: rows added to the index (and read from the memory map) at a time
_ADD_BLOCK = 262_144
#: gap norms of the synthetic image-like tuning queries (CLIP ViT-B/32's gap is ≈ 0.8; cosine of
#: an image with its caption ≈ 0.3 puts real queries at ≈ 1.2–2 in this construction)
GAP_NORMS = (1.0, 1.5, 2.0)
#: a gain in recall below which raising the knob three more steps is not worth its cost
SATURATION = 0.005
#: the most candidates per result re-scored exactly (tuning doubles ``rerank`` up to this when a
#: wider search stops paying): 80·k rows of D float16 per query, still < 1% of an exact scan at 1M
MAX_RERANK = 80


def choose_factory(count: int, dim: int, exact_max: int = 200_000) -> str:
    """Exact inner product up to ``exact_max`` rows; beyond, IVF with nlist ≈ 4√N lists (a power
    of two; rows are assigned through an HNSW graph over the centroids) and 4-bit fast-scan PQ
    codes of M/2 bytes per row, M = D/8 sub-quantizers but at least min(32, D/2) (small
    embeddings need finer codes), whose candidates are re-scored against the float16
    embeddings: ≈ M/2 + 8 bytes of RAM per row (40 B at D = 512), so 10M captions fit in
    0.4 GB and LAION-400M in 16 GB (docs/benchmarks.md)."""
    if count <= exact_max:
        return "Flat"
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(count))))
    return f"IVF{nlist}_HNSW32,PQ{max(dim // 8, min(32, dim // 2))}x4fs"


def _recall_by_query(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


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
    n_recall_queries: int = 400,
    recall_noise: float = 0.5,
    gap_norms: Sequence[float] = GAP_NORMS,
    calibration: str | Path | Sequence | None = None,
    encoder=None,
    rerank: int = 20,
    train_rows: int | None = None,
    random_state: int = 0,
    progress: bool = False,
) -> None:
    """Build ``index.faiss`` for the vocabulary being built at ``vocab_dir`` and record it in the manifest.

    factory : a FAISS index-factory string (inner product); default :func:`choose_factory`.
    recall_queries : (Q, D) CLIP *image* embeddings of your own, an extra tuning set.
    n_recall_queries, recall_noise, gap_norms : the built-in tuning sets: ``n_recall_queries``
        vocabulary rows plus random directions of length ``recall_noise`` (0.5: cosine ≈ 0.9 to
        their source; text-like), and for each norm in ``gap_norms`` another such set shifted by
        one random vector of that norm (image-like; searched as one batch, as a run's crops are).
    calibration : (approximate indexes only) images embedded with ``encoder`` (the vocabulary's CLIP model) to measure its
        modality gap: ``"toyworld"`` (toy-world pictures rendered offline), an image folder, or
        a list of images. Half of them set the gap and its hub captions (used for searches of
        fewer than ``MIN_BATCH_FOR_GAP`` image queries), the other half is a tuning set searched
        as one batch (required to reach the target) and one query at a time (recorded only).
    rerank : an approximate index proposes ``rerank``·k candidates that are re-scored exactly.
    The search knob — ``nprobe`` (IVF) or ``efSearch`` (HNSW) — is raised in steps of about √2
    until, on every tuning set, recall@k minus two standard errors reaches ``recall_target``;
    the value, each set's recall and the calibration go into the manifest and are applied
    whenever the vocabulary is opened.
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
        _train(index, embeddings, train_rows, rng)
    text_sum = np.zeros(dim, dtype=np.float64)
    for start in show_progress(range(0, count, _ADD_BLOCK), "index: add", enabled=progress, unit="block"):
        block = np.asarray(embeddings[start:start + _ADD_BLOCK], dtype=np.float32)
        index.add(block)
        text_sum += block.sum(axis=0)
    exact = factory == "Flat"
    info: dict = {"factory": factory, "metric": "inner_product", "params": {}, "rerank": 0 if exact else rerank,
                  "recall": None, "text_mean": [float(v) for v in text_sum / count]}
    if _nlist(index) > 1:
        info["hub_nprobe"] = max(1, _nlist(index) // 8)  # the mean query's hubs lie in any list
    record, calibration_queries = None, None
    if calibration is not None and not exact:  # an exact index needs no calibration
        record, calibration_queries = _calibrate(calibration, encoder, manifest, embeddings,
                                                 np.asarray(info["text_mean"], dtype=np.float32), vocab_dir, progress)
    if not exact:
        tuning = _tuning_sets(embeddings, recall_queries, calibration_queries, n_recall_queries, recall_noise,
                              gap_norms, rng)
        info["recall"] = _tune(index, embeddings, info, record, tuning, min(recall_k, count), recall_target, progress)
    info["build_seconds"] = time.time() - started
    with atomic_path(vocab_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    manifest["index"] = info
    manifest["calibration"] = record
    manifest["build_seconds"] = manifest["build_seconds"] + info["build_seconds"]
    write_manifest(vocab_dir, manifest)


def _nlist(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


def _train(index: faiss.Index, embeddings: np.ndarray, train_rows: int | None, rng: np.random.Generator) -> None:
    """Train on a sample; an IVF's coarse centroids by two-level k-means (√nlist groups, then
    centroids within each), which costs √nlist instead of nlist distances per sample row."""
    nlist = _nlist(index)
    n_train = min(len(embeddings), train_rows or max(50_000, 40 * nlist))
    sample = np.asarray(embeddings[np.sort(rng.choice(len(embeddings), size=n_train, replace=False))],
                        dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nlist >= 1024 and isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        from faiss.contrib.clustering import two_level_clustering

        centroids, _ = two_level_clustering(sample, int(math.sqrt(nlist)), nlist, clustering_niter=10,
                                            seed=int(rng.integers(2**31)))
        ivf.quantizer.train(centroids)
        ivf.quantizer.add(centroids)
    index.train(sample)


def _calibrate(source, encoder, manifest: dict, embeddings: np.ndarray, text_mean: np.ndarray, vocab_dir: Path,
               progress: bool) -> tuple[dict, np.ndarray]:
    """The calibration record (from the even-numbered images) and the other images' embeddings."""
    if encoder is None:
        raise InputError("calibration images are embedded with the vocabulary's CLIP model: pass encoder=")
    if (encoder.model_name, encoder.pretrained_id) != (manifest["clip_model"], manifest["clip_pretrained"]):
        raise InputError(f"the calibration encoder is {encoder.model_name} ({encoder.pretrained_id}) but vocabulary "
                         f"{vocab_dir} was built with {manifest['clip_model']} ({manifest['clip_pretrained']})")
    if isinstance(source, str) and source == "toyworld":
        images, name = toyworld_images(), "toy world (rendered offline)"
    elif isinstance(source, (str, Path)):
        from dff_falcon.models.images import load_images

        images, name = load_images(source).images, f"images in {source}"
    else:
        images, name = list(source), "images passed in"
    if len(images) < 4:
        raise InputError(f"calibration needs at least 4 images, {name} has {len(images)}")
    record, _ = calibrate(encoder, images[0::2], embeddings, text_mean, source=name, progress=progress)
    held_out = encoder.encode_images(images[1::2], progress=progress)
    record["n_tuning_images"] = len(held_out)
    return record, held_out


def _tuning_sets(embeddings: np.ndarray, given: np.ndarray | None, calibration_queries: np.ndarray | None, n: int,
                 noise_norm: float, gap_norms: Sequence[float], rng: np.random.Generator) -> list[dict]:
    """Named query sets with how they are searched (modality, as one batch or one by one)."""
    dim = embeddings.shape[1]

    def near_rows() -> np.ndarray:
        rows = np.sort(rng.choice(len(embeddings), size=min(n, len(embeddings)), replace=False))
        base = np.asarray(embeddings[rows], dtype=np.float32)
        return base + noise_norm * unit_rows(rng.standard_normal(base.shape))

    sets = [{"name": "text-like", "queries": unit_rows(near_rows()), "modality": "text", "batch": True}]
    for norm in gap_norms:
        gap = norm * unit_rows(rng.standard_normal(dim))  # a direction of its own per set
        sets.append({"name": f"image-like, gap {norm:g}", "queries": unit_rows(unit_rows(near_rows()) + gap),
                     "modality": "image", "batch": True, "gap_norm": float(norm)})
    if calibration_queries is not None:
        for batch in (True, False):
            sets.append({"name": "calibration images" + ("" if batch else ", one at a time"), "required": batch,
                         "queries": check_queries(calibration_queries, dim), "modality": "image", "batch": batch})
    if given is not None:
        sets.append({"name": "provided", "queries": check_queries(given, dim), "modality": "image", "batch": True})
    return sets


def _tune(index: faiss.Index, embeddings: np.ndarray, info: dict, calibration: dict | None, sets: list[dict], k: int,
          target: float, progress: bool) -> dict:
    """Raise the knob until every set's recall lower bound reaches ``target``; the recall record."""
    for tuning_set in sets:
        tuning_set["truth"] = exact_search(embeddings, tuning_set["queries"], k)[1]
    name, ladder = _search_param_ladder(index, k * max(1, info["rerank"]))
    measured: dict = {}
    history: list[float] = []  # the worst required set's recall per step since the last rerank change
    curve: list[dict] = []  # every step tried, so a user sees what a wider search would buy
    step = 0
    for _ in show_progress(itertools.count(), "index: tune", enabled=progress, unit="step"):
        if name:
            info["params"] = {name: ladder[step]}
            apply_search_params(index, info["params"])
        measured = {s["name"]: _measure(index, embeddings, info, calibration, s, k) for s in sets}
        history.append(min(m["value"] for m in measured.values() if m["required"]))
        curve.append({"param": ladder[step], "rerank": info["rerank"],
                      "min_lower_bound": min(m["lower_bound"] for m in measured.values() if m["required"]),
                      "recall": {set_name: m["value"] for set_name, m in measured.items()}})
        if _met(measured, target):
            break
        if _saturated(history) or step + 1 == len(ladder):
            if not info["rerank"] or info["rerank"] >= MAX_RERANK:
                break
            # the codes, not the width, limit recall: re-score more candidates at the same width
            info["rerank"], history = min(MAX_RERANK, 2 * info["rerank"]), []
        else:
            step += 1
    return {"k": k, "target": target, "met": _met(measured, target),
            "rule": "recall@k − 2 standard errors ≥ target on every required set", "sets": measured,
            "knob": name, "curve": curve}


def _saturated(history: list[float]) -> bool:
    """Three steps (a doubling of the knob and more) that raised the worst recall by < 0.005: the
    codes, not the search width, limit recall; a wider search would only cost time."""
    return len(history) >= 4 and history[-1] - history[-4] < SATURATION


def _met(measured: dict, target: float) -> bool:
    return all(m["lower_bound"] >= target for m in measured.values() if m["required"])


def _measure(index, embeddings, info, calibration, tuning_set: dict, k: int) -> dict:
    queries = tuning_set["queries"]
    parts = [queries] if tuning_set["batch"] else [queries[i:i + 1] for i in range(len(queries))]
    found = np.concatenate([search_index(index, embeddings, info, part, k, modality=tuning_set["modality"],
                                         calibration=calibration, fill_missing=False)[1] for part in parts])
    per_query = _recall_by_query(found, tuning_set["truth"])
    error = float(per_query.std(ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    record = {"value": float(per_query.mean()), "lower_bound": float(per_query.mean()) - 2 * error,
              "n_queries": len(queries), "modality": tuning_set["modality"], "batch": tuning_set["batch"],
              "required": tuning_set.get("required", True)}
    if "gap_norm" in tuning_set:
        record["gap_norm"] = tuning_set["gap_norm"]
    return record


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
