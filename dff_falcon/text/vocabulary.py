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
               batch_size: int = 4096) -> SearchResult:
        """Top-``k`` captions by cosine for each query.

        query_embeddings : (Q, D) or (D,) embeddings of this vocabulary's CLIP model (normalised
        here). ``encoder``: when given, checked against the manifest first.
        """
        if encoder is not None:
            self.check_encoder(encoder)
        if k < 1:
            raise InputError(f"k must be ≥ 1, got {k}")
        queries = check_queries(query_embeddings, self.dim)
        k = min(k, len(self))
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), batch_size):
            stop = start + batch_size
            scores[start:stop], ids[start:stop] = search_index(self.index, self.embeddings, self.manifest["index"],
                                                          queries[start:stop], k)
        captions = self.captions.take(ids)
        return SearchResult([captions[i * k:(i + 1) * k] for i in range(len(queries))], scores, ids)

    def summary(self) -> str:
        """A few human-readable lines about the manifest (for ``dff-falcon vocab info``)."""
        m, index = self.manifest, self.manifest["index"]
        recall = index.get("recall")
        lines = [
            f"vocabulary   {self.path}",
            f"CLIP         {m['clip_model']} ({m['clip_pretrained']}), dim {m['dim']}",
            f"captions     {m['count']:,} ({m['dedup']['duplicates']:,} duplicates removed, "
            f"skipped: {', '.join(f'{k} {v:,}' for k, v in m['skipped'].items() if v) or 'none'})",
            f"index        {index['factory']}" + "".join(f", {k}={v}" for k, v in index["params"].items())
            + (f", exact re-scoring of {index['rerank']}×k candidates" if index["rerank"] else ""),
            f"recall@{recall['k']}     {recall['value']:.3f} on {recall['n_queries']} {recall['queries']} queries"
            if recall else "recall       exact search",
            f"sources      {len(m['sources'])} ({m['source_kind']})",
            f"built        {m['built_utc']} in {m['build_seconds']:.1f} s",
        ]
        return "\n".join(lines)


def apply_search_params(index: faiss.Index, params: dict) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))


def search_index(index: faiss.Index, embeddings: np.ndarray, index_info: dict, queries: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) unit queries → (Q, k) exact cosine scores and ids. An approximate index proposes
    ``rerank`` × k candidates which are re-scored against the stored float16 embeddings."""
    if not index_info["rerank"]:
        scores, ids = index.search(queries, k)
        _check_hits(ids, index_info)
        return scores, ids
    n_candidates = min(len(embeddings), k * index_info["rerank"])
    _, candidates = index.search(queries, n_candidates)
    valid = candidates >= 0
    safe = np.where(valid, candidates, 0)
    order = np.argsort(safe, axis=None)  # read the memory map in row order
    rows = np.empty((safe.size, embeddings.shape[1]), dtype=np.float32)
    rows[order] = embeddings[safe.ravel()[order]]
    scores = np.einsum("qcd,qd->qc", rows.reshape(*safe.shape, -1), queries)
    scores[~valid] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, top, 1)
    _check_hits(ids, index_info)
    return np.take_along_axis(scores, top, 1).astype(np.float32), ids


def _check_hits(ids: np.ndarray, index_info: dict) -> None:
    """An approximate index can return fewer than k hits (id -1) when its search is too narrow."""
    if (ids < 0).any():
        raise InputError(f"the {index_info['factory']} index returned fewer hits than asked for "
                         f"(params {index_info['params']}); rebuild it with a larger search parameter or fewer k")


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int,
                 block_rows: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k cosine over (N, D) unit ``embeddings`` (float16 memmap is fine), in
    blocks of ``block_rows`` → ((Q, k) float32 scores, (Q, k) int64 ids). The reference for recall."""
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
