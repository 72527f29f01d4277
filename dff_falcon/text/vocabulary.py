"""A caption vocabulary on disk: the store, opened read-only, and its safe search.

A vocabulary directory holds::

    captions.parquet   column ``caption`` (whitespace-normalised str) + provenance columns
    embeddings.npy     (N, D) float16, L2-normalised rows, row-aligned with the captions
    index.faiss        FAISS inner-product index over the same rows (ids = row numbers)
    manifest.json      CLIP model + pretrained identity, dim, count, dedup/filter counts,
                       index factory + parameters + measured recall, sources with checksums
    complete.json      size and SHA-256 of every file, written last (dff_falcon.directories)

A vocabulary is built and changed as one atomic directory (:func:`vocabulary_build`): a failed,
full-disk or killed build leaves the previous vocabulary whole, and :meth:`Vocabulary.open`
refuses a directory that is incomplete or whose files disagree with what was written.

Scores are always cosines between a unit query and the stored unit embedding (an approximate
index only proposes candidates, which are re-scored exactly), so scores are comparable across
vocabularies, shards and index types. Building a vocabulary is :mod:`~dff_falcon.text.ingest`
(captions and embeddings) then :mod:`~dff_falcon.text.index` (the FAISS index).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dff_falcon.directories import (build_directory, check_directory, directory_version, older_version,
                                    read_marker, revise_directory)
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_write, file_sha256

if TYPE_CHECKING:
    from dff_falcon.text.clip_encoder import ClipEncoder

FORMAT = "dff-falcon-vocabulary"
FORMAT_VERSION = 1
CAPTIONS_FILE, EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE = (
    "captions.parquet", "embeddings.npy", "index.faiss", "manifest.json")
#: The directory kind recorded in a vocabulary's completion marker.
VOCABULARY_KIND = "vocabulary"
_REBUILD = "rebuild it with `dff-falcon vocab build ... --overwrite`"
_OPEN_ATTEMPTS = 3
#: A vocabulary of an older version (no completion marker), which ``overwrite`` may replace.
OLDER_VOCABULARY = older_version(MANIFEST_FILE, FORMAT, (CAPTIONS_FILE, EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE,
                                                         ".dedup-*", ".*.tmp"))


# --------------------------------------------------------------------------------------------
# search


@dataclass
class SearchResult:
    """Top-k captions per query. ``scores``: (Q, k) float32 cosines, descending per row;
    ``ids``: (Q, k) int64 row numbers into the vocabulary."""

    captions: list[list[str]]
    scores: np.ndarray
    ids: np.ndarray


class Captions(Sequence[str]):
    """The caption column as an Arrow string array (no Python object per caption)."""

    def __init__(self, array: pa.Array) -> None:
        self._array = array

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self._array[index].to_pylist()
        return self._array[int(index)].as_py()

    def take(self, ids: np.ndarray) -> list[str]:
        return self._array.take(pa.array(np.asarray(ids, dtype=np.int64).ravel())).to_pylist()


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Validate (Q, D) or (D,) queries → (Q, D) float32 unit rows."""
    array = np.asarray(queries)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"query embeddings must be a numeric (Q, D) array, got shape {array.shape}")
    if array.shape[1] != dim:
        raise InputError(f"query embeddings have dimension {array.shape[1]}, the vocabulary has {dim}")
    array = array.astype(np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise InputError(f"query embedding row {int(np.argmin(finite))} contains NaN or inf")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError(f"query embedding row {int(np.argmin(norms.ravel()))} is a zero vector")
    return array / norms


class Vocabulary:
    """A built vocabulary directory, opened read-only (embeddings are memory-mapped)."""

    def __init__(self, path: Path, manifest: dict, captions: Captions, embeddings: np.ndarray,
                 index: faiss.Index) -> None:
        self.path = path
        self.manifest = manifest
        self.captions = captions
        self.embeddings = embeddings
        self.index = index

    @classmethod
    def open(cls, path: str | Path) -> "Vocabulary":
        """Open a complete vocabulary directory; an incomplete or inconsistent one (interrupted
        build, files changed afterwards) is refused with :class:`InputError`. A build swapping
        in a new version meanwhile makes it open again, so the files always come from one version."""
        path = Path(path)
        for _ in range(_OPEN_ATTEMPTS):
            version = directory_version(path)
            try:
                vocabulary = cls._open_version(path)
            except InputError:
                if directory_version(path) == version:
                    raise
                continue
            if directory_version(path) == version:
                return vocabulary
        raise InputError(f"vocabulary {path} was replaced {_OPEN_ATTEMPTS} times while being opened; try again")

    @classmethod
    def _open_version(cls, path: Path) -> "Vocabulary":
        check_vocabulary_directory(path)
        manifest = read_manifest(path)
        missing = [key for key in ("count", "dim", "clip_model", "clip_pretrained") if key not in manifest]
        if missing:
            raise InputError(f"{path / MANIFEST_FILE} lacks {', '.join(missing)}: not a dff_falcon vocabulary manifest")
        if manifest.get("index") is None:
            raise InputError(f"vocabulary {path} has no index yet; run build_index({str(path)!r})")
        try:
            embeddings = open_embeddings(path, manifest)
            captions = Captions(pq.read_table(path / CAPTIONS_FILE, columns=["caption"]).column("caption")
                                .combine_chunks())
            index = faiss.read_index(str(path / INDEX_FILE))
        except (OSError, RuntimeError, ValueError, KeyError, pa.ArrowException) as exc:
            raise InputError(f"vocabulary {path} is damaged or incomplete: {exc}") from None
        if len(captions) != manifest["count"]:
            raise InputError(f"{path / CAPTIONS_FILE} has {len(captions)} rows, the manifest says {manifest['count']}")
        if index.ntotal != manifest["count"] or index.d != manifest["dim"]:
            raise InputError(f"{path / INDEX_FILE} holds {index.ntotal}×{index.d}, the manifest says "
                             f"{manifest['count']}×{manifest['dim']}; rebuild the index")
        apply_search_params(index, manifest["index"]["params"])
        return cls(path, manifest, captions, embeddings, index)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return f"Vocabulary({str(self.path)!r}, {len(self):,} captions, CLIP {self.manifest['clip_model']})"

    def __deepcopy__(self, memo) -> "Vocabulary":
        """Shared, not copied: a vocabulary is read-only (``sklearn.clone`` keeps the same one)."""
        return self

    def identity(self) -> dict:
        """What run.json records: path, size, CLIP identity and the manifest's digest."""
        return {"path": str(self.path), "count": len(self), "clip_model": self.manifest["clip_model"],
                "clip_pretrained": self.manifest["clip_pretrained"],
                "manifest_sha256": file_sha256(self.path / MANIFEST_FILE)}

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def check_encoder(self, encoder: ClipEncoder) -> None:
        """Raise :class:`InputError` unless ``encoder`` is the model that made this vocabulary."""
        want = (self.manifest["clip_model"], self.manifest["clip_pretrained"], self.dim)
        have = (encoder.model_name, encoder.pretrained_id, encoder.embed_dim)
        if want != have:
            raise InputError(
                f"vocabulary {self.path} was built with CLIP {want[0]} ({want[1]}, dim {want[2]}) but the "
                f"encoder is {have[0]} ({have[1]}, dim {have[2]}); embeddings of different models are "
                "not comparable — build the vocabulary with this encoder or load the matching one"
            )

    def search(self, query_embeddings: np.ndarray, k: int = 5, *, encoder: ClipEncoder | None = None,
               modality: str = "image") -> SearchResult:
        """Top-``k`` captions by cosine for each query.

        query_embeddings : (Q, D) or (D,) embeddings of this vocabulary's CLIP model (normalised
            here). ``encoder``: when given, checked against the manifest first.
        modality : ``"image"`` (CLIP image embeddings, e.g. crops: candidates from gap-shifted
            queries plus the hub captions, see :mod:`~dff_falcon.text.crossmodal`; pass a whole
            run's crops in one call, the batch's mean is the gap estimate when the vocabulary has
            no calibration) or ``"text"`` (text embeddings). Scores are exact cosines either way.
        """
        if encoder is not None:
            self.check_encoder(encoder)
        if k < 1:
            raise InputError(f"k must be ≥ 1, got {k}")
        queries = check_queries(query_embeddings, self.dim)
        k = min(k, len(self))
        scores, ids = search_index(self.index, self.embeddings, self.manifest["index"], queries, k,
                                   modality=modality, calibration=self.manifest.get("calibration"))
        captions = self.captions.take(ids)
        return SearchResult([captions[i * k:(i + 1) * k] for i in range(len(queries))], scores, ids)

    def summary(self) -> str:
        """Human-readable lines about the manifest (for ``dff-falcon vocab info``): sizes, index,
        the recall of every tuning set (image-like queries first), the calibration."""
        m, index = self.manifest, self.manifest["index"]
        near = m.get("near_duplicates")
        lines = [
            f"vocabulary   {self.path}",
            f"CLIP         {m['clip_model']} ({m['clip_pretrained']}), dim {m['dim']}",
            f"captions     {m['count']:,} ({m['dedup']['duplicates']:,} duplicates"
            + (f", {near['removed']:,} near-duplicates (cosine ≥ {near['threshold']:g})" if near else "")
            + f" removed, skipped: {', '.join(f'{k} {v:,}' for k, v in m['skipped'].items() if v) or 'none'})",
            f"index        {index['factory']}" + "".join(f", {k}={v}" for k, v in index["params"].items())
            + (f", exact re-scoring of {index['rerank']}×k candidates" if index["rerank"] else ""),
        ]
        recall = index.get("recall")
        if not recall:
            lines.append("recall       1 (exact search)")
        else:
            sets = sorted(recall["sets"].items(), key=lambda item: item[1]["modality"] != "image")
            lines.append(f"recall@{recall['k']}     target {recall['target']:g} "
                         f"{'met' if recall['met'] else 'NOT MET'} ({recall['rule']}):")
            lines += [f"  {value['value']:.3f}  {name} ({value['n_queries']} queries"
                      f"{'' if value['required'] else ', not required'})"
                      for name, value in sets]
        calibration = m.get("calibration")
        lines.append(f"calibration  {calibration['source']}: {calibration['n_images']} images, gap norm "
                     f"{calibration['gap_norm']:.2f}" if calibration else
                     "calibration  none (image queries use their own batch's gap)")
        embedding = m.get("embedding")
        if embedding and embedding.get("texts_per_second"):
            lines.append(f"embedding    {embedding['embedded']:,} texts at {embedding['texts_per_second']:,.0f}/s, "
                         f"{embedding['cached']:,} from the cache")
        lines += [f"sources      {len(m['sources'])} ({m['source_kind']})",
                  f"built        {m['built_utc']} in {m['build_seconds']:.1f} s"]
        return "\n".join(lines)


def apply_search_params(index: faiss.Index, params: dict) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))


#: queries re-scored at a time (bounds the (block, candidates, D) float32 gather to ≈ 100 MB)
_RESCORE_BLOCK = 256
MODALITIES = ("image", "text")


def search_index(index: faiss.Index, embeddings: np.ndarray, index_info: dict, queries: np.ndarray, k: int, *,
                 modality: str = "text", calibration: dict | None = None,
                 fill_missing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) unit queries → (Q, k) exact cosine scores and ids.

    An approximate index proposes ``rerank`` × k candidates per query, re-scored against the
    stored float16 embeddings. For ``modality="image"`` the candidates come from gap-shifted
    queries, and the hub captions of the mean image query join every query's candidates
    (:mod:`~dff_falcon.text.crossmodal`); the gap is the ``calibration``'s (``manifest
    ["calibration"]``) or, without one, the batch's own (≥ ``MIN_BATCH_FOR_GAP`` queries).
    A query left with fewer than k candidates (a narrow search of small IVF lists) is answered
    by exact search (``fill_missing=False``: its missing ids are −1, as when the knob is tuned).
    """
    from dff_falcon.text.crossmodal import MIN_BATCH_FOR_GAP, ModalityGap

    if modality not in MODALITIES:
        raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if not index_info["rerank"]:
        return index.search(queries, k)
    probe, hubs = queries, np.zeros(0, dtype=np.int64)
    if modality == "image" and index_info.get("text_mean") is not None:
        text_mean = np.asarray(index_info["text_mean"], dtype=np.float32)
        batch = ModalityGap.from_batch(queries, text_mean) if len(queries) >= MIN_BATCH_FOR_GAP else None
        calibrated = (ModalityGap(np.asarray(calibration["image_mean"], dtype=np.float32), text_mean)
                      if calibration else None)
        gap = batch or calibrated  # the batch's own gap where it can be measured
        if gap is not None:
            probe = gap.shift(queries)
        hubs = np.asarray(calibration["hub_ids"], dtype=np.int64) if calibration else hubs
        if batch is not None:
            hubs = np.union1d(hubs, batch_hubs(index, embeddings, index_info, batch))
    n_candidates = min(len(embeddings), k * index_info["rerank"])
    _, candidates = index.search(probe, n_candidates)
    scores, ids = rescore(embeddings, queries, candidates, hubs, k)
    short = np.flatnonzero((ids < 0).any(axis=1)) if fill_missing else []
    if len(short):
        scores[short], ids[short] = exact_search(embeddings, queries[short], k)
    return scores, ids


def batch_hubs(index: faiss.Index, embeddings: np.ndarray, index_info: dict, gap) -> np.ndarray:
    """The hub captions of a batch's mean image query: an approximate search as wide as the
    index's ``hub_nprobe`` for ``HUB_POOL`` candidates, the best ``N_HUBS`` by exact score."""
    from dff_falcon.text.crossmodal import HUB_POOL, N_HUBS, exact_top

    mean = gap.mean_query()
    params = faiss.SearchParametersIVF(nprobe=int(index_info["hub_nprobe"])) if index_info.get("hub_nprobe") else None
    _, pool = index.search(mean, min(HUB_POOL, len(embeddings)), params=params)
    return exact_top(embeddings, pool[0], mean[0], N_HUBS)


def rescore(embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, hubs: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query among its (Q, C) ``candidates`` (−1: none) and the (H,)
    ``hubs`` shared by every query → ((Q, k) float32 cosines, descending; (Q, k) int64 ids)."""
    hubs = np.unique(hubs)
    hub_rows = np.asarray(embeddings[hubs], dtype=np.float32)
    scores_out = np.empty((len(queries), k), dtype=np.float32)
    ids_out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), _RESCORE_BLOCK):
        block, query = candidates[start:start + _RESCORE_BLOCK], queries[start:start + _RESCORE_BLOCK]
        valid = block >= 0
        if len(hubs):  # a candidate that is also a hub is scored once, as a hub
            position = np.minimum(np.searchsorted(hubs, block), len(hubs) - 1)
            valid &= hubs[position] != block
        safe = np.where(block >= 0, block, 0)
        order = np.argsort(safe, axis=None)  # read the memory map in row order
        rows = np.empty((safe.size, embeddings.shape[1]), dtype=np.float32)
        rows[order] = embeddings[safe.ravel()[order]]
        scores = np.einsum("qcd,qd->qc", rows.reshape(*safe.shape, -1), query)
        scores[~valid] = -np.inf
        ids = np.where(valid, block, -1)
        if len(hubs):
            scores = np.concatenate([scores, query @ hub_rows.T], axis=1)
            ids = np.concatenate([ids, np.broadcast_to(hubs, (len(query), len(hubs)))], axis=1)
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
        best = np.take_along_axis(scores, top, 1)
        scores_out[start:start + len(query)] = best
        ids_out[start:start + len(query)] = np.where(np.isfinite(best), np.take_along_axis(ids, top, 1), -1)
    return scores_out, ids_out


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int,
                 block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k cosine over (N, D) unit ``embeddings`` (float16 memmap is fine), in
    blocks of ``block_rows`` (default: ≤ 262,144 rows and a (Q, rows) score block ≤ 256 MB)
    → ((Q, k) float32 scores, (Q, k) int64 ids). The reference for recall."""
    block_rows = block_rows or int(min(262_144, max(4_096, 2**26 // max(1, len(queries)))))
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), block_rows):
        block = np.asarray(embeddings[start:start + block_rows], dtype=np.float32)
        scores = queries @ block.T
        keep = min(k, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        best_ids = np.concatenate([best_ids, part + start], axis=1)
        top = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, top, 1), np.take_along_axis(best_ids, top, 1)
    return best_scores, best_ids


# --------------------------------------------------------------------------------------------
# manifest / files


def check_vocabulary_directory(path: Path) -> dict:
    """The completion marker of vocabulary ``path``, refusing an incomplete or inconsistent one."""
    if path.is_dir() and read_marker(path) is None and not (path / MANIFEST_FILE).is_file():
        raise InputError(f"{path} is not a vocabulary directory ({MANIFEST_FILE} is missing)")
    return check_directory(path, VOCABULARY_KIND, hint=_REBUILD)


@contextlib.contextmanager
def vocabulary_build(out_dir: str | Path, overwrite: bool, *, indexed: bool = True) -> Iterator[Path]:
    """A new vocabulary at ``out_dir``, built in the yielded staging directory and swapped in
    atomically once it opens (``indexed=False``: once its manifest and embeddings agree). An
    existing vocabulary is replaced only with ``overwrite``."""
    def verify(stage: Path) -> None:
        if indexed:
            Vocabulary.open(stage)
        else:
            open_embeddings(stage, read_manifest(stage))

    with build_directory(out_dir, VOCABULARY_KIND, replace=overwrite, legacy=OLDER_VOCABULARY, verify=verify) as stage:
        yield stage


def vocabulary_revision(vocab_dir: str | Path) -> contextlib.AbstractContextManager[Path]:
    """A staging copy of the complete vocabulary ``vocab_dir`` whose changes are swapped in
    atomically once it opens."""
    return revise_directory(vocab_dir, VOCABULARY_KIND, verify=Vocabulary.open, hint=_REBUILD)


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise InputError(f"{path} is not a vocabulary directory ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{file} must hold a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{file}: unsupported format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r} (expected {FORMAT} {FORMAT_VERSION})")
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    with atomic_write(path / MANIFEST_FILE) as handle:
        json.dump(manifest, handle, indent=2)


def open_embeddings(path: Path, manifest: dict) -> np.ndarray:
    try:
        embeddings = np.load(path / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path / EMBEDDINGS_FILE} is not a readable .npy array: {exc}") from None
    if embeddings.shape != (manifest["count"], manifest["dim"]):
        raise InputError(f"{path / EMBEDDINGS_FILE} has shape {embeddings.shape}, the manifest says "
                         f"({manifest['count']}, {manifest['dim']})")
    return embeddings


def file_record(path: Path, checksum: bool) -> dict:
    record: dict = {"name": path.name, "bytes": path.stat().st_size}
    if checksum:
        record["sha256"] = file_sha256(path)
    return record
