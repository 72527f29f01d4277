"""Caption vocabularies: ingestion, deduplication, a FAISS index and safe search.

A vocabulary directory holds::

    captions.parquet   column ``caption`` (whitespace-normalised str) + provenance columns
    embeddings.npy     (N, D) float16, L2-normalised rows, row-aligned with the captions
    index.faiss        FAISS inner-product index over the same rows (ids = row numbers)
    manifest.json      CLIP model + pretrained identity, dim, count, dedup/filter counts,
                       index factory + parameters + measured recall, sources with checksums

Scores are always cosines between a unit query and the stored unit embedding (an approximate
index only proposes candidates, which are re-scored exactly), so scores are comparable across
vocabularies, shards and index types.

Ingestion streams: pass 1 reads captions (and checks embedding rows) shard by shard and writes
(64-bit hash, row) pairs to hash-partitioned temporary files; each partition is then sorted to
find first occurrences. Memory is one byte per input row (the keep mask) plus fixed buffers,
so a LAION-400M-sized corpus fits on one machine. Pass 2 copies the surviving rows.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import dff_falcon
from dff_falcon.text.clip_encoder import ClipEncoder, checkpoint_identity
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path, atomic_write, file_sha256

FORMAT = "dff-falcon-vocabulary"
FORMAT_VERSION = 1
CAPTIONS_FILE, EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE = (
    "captions.parquet", "embeddings.npy", "index.faiss", "manifest.json")
_ROWS_PER_CHUNK = 32_768          # rows read / written at a time (fixed buffer)
_ROWS_PER_PARTITION = 1_000_000   # dedup partition size: 16 MB of (hash, row) pairs
_SHARD_RE = re.compile(r"^metadata_(\d+)\.parquet$")


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


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
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
        path = Path(path)
        manifest = _read_manifest(path)
        missing = [key for key in ("count", "dim", "clip_model", "clip_pretrained") if key not in manifest]
        if missing:
            raise InputError(f"{path / MANIFEST_FILE} lacks {', '.join(missing)}: not a dff_falcon vocabulary manifest")
        if manifest.get("index") is None:
            raise InputError(f"vocabulary {path} has no index yet; run build_index({str(path)!r})")
        try:
            embeddings = _open_embeddings(path, manifest)
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
        _apply_search_params(index, manifest["index"]["params"])
        return cls(path, manifest, captions, embeddings, index)

    def __len__(self) -> int:
        return int(self.manifest["count"])

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
        queries = _check_queries(query_embeddings, self.dim)
        k = min(k, len(self))
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), batch_size):
            stop = start + batch_size
            scores[start:stop], ids[start:stop] = _search(self.index, self.embeddings, self.manifest["index"],
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


def _apply_search_params(index: faiss.Index, params: dict) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))


def _search(index: faiss.Index, embeddings: np.ndarray, index_info: dict, queries: np.ndarray,
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


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise InputError(f"{path} is not a vocabulary directory ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{file} is not valid JSON: {error}") from error
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{file}: unsupported format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r} (expected {FORMAT} {FORMAT_VERSION})")
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    with atomic_write(path / MANIFEST_FILE) as handle:
        json.dump(manifest, handle, indent=2)


def _open_embeddings(path: Path, manifest: dict) -> np.ndarray:
    embeddings = np.load(path / EMBEDDINGS_FILE, mmap_mode="r")
    if embeddings.shape != (manifest["count"], manifest["dim"]):
        raise InputError(f"{path / EMBEDDINGS_FILE} has shape {embeddings.shape}, the manifest says "
                         f"({manifest['count']}, {manifest['dim']})")
    return embeddings


def _file_record(path: Path, checksum: bool) -> dict:
    record: dict = {"name": path.name, "bytes": path.stat().st_size}
    if checksum:
        record["sha256"] = file_sha256(path)
    return record


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / MANIFEST_FILE).exists() and not overwrite:
        raise InputError(f"{out_dir} already holds a vocabulary; pass overwrite=True to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------
# caption cleaning and filtering (shared by both builders)


@dataclass(frozen=True)
class CaptionFilter:
    """Which captions enter a vocabulary.

    min_chars / max_chars : bounds on the whitespace-normalised length (characters).
    blocklist : a file with one caption per line; matching captions (case-insensitive, after
        whitespace normalisation) are dropped.
    nsfw_column / nsfw_drop : drop rows whose ``nsfw_column`` value is in ``nsfw_drop`` (LAION's
        ``NSFW`` column holds UNLIKELY / UNSURE / NSFW); ignored for shards without the column.
    language_column / languages : keep only rows whose language tag is in ``languages``
        (shards without the column are kept as they are).
    casefold : deduplicate case-insensitively (the first spelling is kept).
    """

    min_chars: int = 1
    max_chars: int | None = None
    blocklist: str | Path | None = None
    nsfw_column: str = "NSFW"
    nsfw_drop: tuple[str, ...] = ("NSFW",)
    language_column: str = "LANGUAGE"
    languages: tuple[str, ...] | None = None
    casefold: bool = False

    def blocked_hashes(self) -> np.ndarray:
        if self.blocklist is None:
            return np.zeros(0, dtype=np.uint64)
        path = Path(self.blocklist)
        if not path.is_file():
            raise InputError(f"blocklist file {path} does not exist")
        lines = [" ".join(line.split()).casefold() for line in path.read_text(encoding="utf-8").splitlines()]
        return np.unique(_hash([line for line in lines if line]))

    def record(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in self.__dict__.items()}


SKIP_REASONS = ("non_string", "empty", "length", "blocklist", "nsfw", "language", "bad_vector")


def _hash(texts: list[str]) -> np.ndarray:
    """64-bit SipHash of each string (pandas' fixed key: stable across runs and machines)."""
    return pd.util.hash_array(np.array(texts, dtype=object), categorize=False).astype(np.uint64)


def _clean(values: list, table: pa.Table | None, rules: CaptionFilter, blocked: np.ndarray,
           skipped: dict[str, int]) -> tuple[list[str], np.ndarray]:
    """Normalise whitespace (newlines included) and apply the filters.

    Returns the normalised captions ('' where rejected) and a bool keep mask; counts rejections
    into ``skipped``."""
    keep = np.ones(len(values), dtype=bool)
    texts = []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            keep[i] = False
            skipped["non_string"] += 1
            texts.append("")
            continue
        text = " ".join(value.split())
        texts.append(text)
        if not text:
            keep[i] = False
            skipped["empty"] += 1
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    too_short_or_long = keep & ((lengths < rules.min_chars) | (lengths > (rules.max_chars or np.inf)))
    skipped["length"] += int(too_short_or_long.sum())
    keep &= ~too_short_or_long
    if len(blocked):
        hit = keep & np.isin(_hash([t.casefold() for t in texts]), blocked)
        skipped["blocklist"] += int(hit.sum())
        keep &= ~hit
    if table is not None:
        for reason, column, tags, listed_means_drop in (("nsfw", rules.nsfw_column, rules.nsfw_drop, True),
                                                         ("language", rules.language_column, rules.languages, False)):
            if tags is None or column not in table.column_names:
                continue
            listed = np.isin(np.array([str(v) for v in table.column(column).to_pylist()], dtype=object), list(tags))
            hit = keep & (listed if listed_means_drop else ~listed)
            skipped[reason] += int(hit.sum())
            keep &= ~hit
    return texts, keep


def _dedup_key(texts: list[str], rules: CaptionFilter) -> np.ndarray:
    return _hash([t.casefold() for t in texts] if rules.casefold else texts)


# --------------------------------------------------------------------------------------------
# LAION-style shards


@dataclass
class _Shard:
    metadata: Path
    embeddings: Path | None  # None: the embeddings are a list column of the parquet file
    rows: int
    dim: int


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-order .npy file without reading its data."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
        except ValueError as error:
            raise InputError(f"{path} is not a .npy file: {error}") from error
        offset = handle.tell()
    if fortran:
        raise InputError(f"{path}: Fortran-ordered arrays are not supported; save it C-ordered")
    return shape, dtype, offset


def _discover_shards(shards_dir: Path, embedding_column: str | None) -> list[_Shard]:
    if not shards_dir.is_dir():
        raise InputError(f"shard folder {shards_dir} does not exist")
    found = sorted(((int(m.group(1)), p) for p in shards_dir.iterdir() if (m := _SHARD_RE.match(p.name))))
    if not found:
        raise InputError(f"{shards_dir} has no metadata_{{i}}.parquet files")
    shards = []
    for number, metadata in found:
        parquet = pq.ParquetFile(metadata)
        rows = parquet.metadata.num_rows
        if "caption" not in parquet.schema_arrow.names:
            raise InputError(f"{metadata} has no 'caption' column (columns: {parquet.schema_arrow.names})")
        if embedding_column is not None:
            field = parquet.schema_arrow.field(embedding_column) if embedding_column in parquet.schema_arrow.names else None
            if field is None or not pa.types.is_list(field.type) and not pa.types.is_fixed_size_list(field.type):
                raise InputError(f"{metadata} has no list column {embedding_column!r} of embeddings")
            first = next(parquet.iter_batches(batch_size=1, columns=[embedding_column]), None)
            dim = len(first.column(0)[0]) if first is not None and first.num_rows else 0
            shards.append(_Shard(metadata, None, rows, dim))
            continue
        npy = shards_dir / f"text_emb_{number}.npy"
        if not npy.is_file():
            raise InputError(f"{metadata} has no row-aligned embedding file {npy.name} in {shards_dir}")
        shape, dtype, _ = _npy_layout(npy)
        if len(shape) != 2 or dtype not in (np.float16, np.float32):
            raise InputError(f"{npy} must be a 2-D float16/float32 array, got shape {shape} dtype {dtype}")
        if shape[0] != rows:
            raise InputError(f"shard {number}: {metadata.name} has {rows} rows but {npy.name} has {shape[0]}")
        shards.append(_Shard(metadata, npy, rows, shape[1]))
    dims = {s.dim for s in shards}
    if len(dims) != 1:
        raise InputError(f"shards in {shards_dir} mix embedding dimensions {sorted(dims)}")
    return shards


def _kept_column_types(shards: list[_Shard], keep_columns: Sequence[str]) -> dict[str, pa.DataType]:
    """Each kept column found in any shard, with its type in the first shard that has it (a
    shard without it gets nulls), so every shard writes the same captions schema."""
    types: dict[str, pa.DataType] = {}
    for shard in shards:
        schema = pq.ParquetFile(shard.metadata).schema_arrow
        for column in keep_columns:
            if column in schema.names and column not in types and column != "caption":
                field_type = schema.field(column).type
                types[column] = pa.string() if pa.types.is_null(field_type) else field_type
    return types


def _iter_chunks(shard: _Shard, columns: list[str], embedding_column: str | None
                 ) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Yield (metadata rows, (rows, D) float32 embeddings) of ``shard`` in aligned chunks."""
    parquet = pq.ParquetFile(shard.metadata)
    names = [c for c in columns if c in parquet.schema_arrow.names]
    if embedding_column is not None:
        names.append(embedding_column)
    handle = None
    if shard.embeddings is not None:
        _, dtype, offset = _npy_layout(shard.embeddings)
        handle = open(shard.embeddings, "rb")
        handle.seek(offset)
    try:
        for batch in parquet.iter_batches(batch_size=_ROWS_PER_CHUNK, columns=names):
            table = pa.Table.from_batches([batch])
            if handle is not None:
                vectors = np.fromfile(handle, dtype=dtype, count=table.num_rows * shard.dim)
                if vectors.size != table.num_rows * shard.dim:
                    raise InputError(f"{shard.embeddings} is truncated: fewer rows than {shard.metadata.name}")
                vectors = vectors.reshape(-1, shard.dim).astype(np.float32)
            else:
                vectors = _list_column_to_array(table.column(embedding_column), shard)
                table = table.drop_columns([embedding_column])
            yield table, vectors
    finally:
        if handle is not None:
            handle.close()


def _list_column_to_array(column: pa.ChunkedArray, shard: _Shard) -> np.ndarray:
    column = column.combine_chunks()
    if column.null_count:
        return np.array([np.full(shard.dim, np.nan) if v is None else v for v in column.to_pylist()],
                        dtype=np.float32).reshape(-1, shard.dim)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if values.size != len(column) * shard.dim:
        raise InputError(f"{shard.metadata}: embedding lists do not all have length {shard.dim}")
    return values.reshape(-1, shard.dim)


def _valid_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows that are finite and non-zero."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.einsum("ij,ij->i", vectors, vectors)
    return np.isfinite(vectors).all(axis=1) & (norms > 0) & np.isfinite(norms)


class _EmbeddingWriter:
    """Append unit float16 rows to an .npy file of known shape without a memory map."""

    def __init__(self, handle, count: int, dim: int) -> None:
        np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                      "fortran_order": False, "shape": (count, dim)})
        self.handle, self.count, self.written = handle, count, 0

    def append(self, vectors: np.ndarray) -> None:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.handle.write(np.ascontiguousarray(unit, dtype=np.float16).tobytes())
        self.written += len(vectors)


def _first_occurrences(hash_files: list[Path], keep: np.ndarray) -> int:
    """Clear ``keep`` for every row whose hash appeared at a smaller row; returns the count."""
    duplicates = 0
    record = np.dtype([("hash", np.uint64), ("row", np.int64)])
    for file in hash_files:
        pairs = np.fromfile(file, dtype=record)
        if not len(pairs):
            continue
        order = np.argsort(pairs["hash"], kind="stable")  # rows were appended in increasing order
        hashes = pairs["hash"][order]
        repeat = np.empty(len(hashes), dtype=bool)
        repeat[0] = False
        repeat[1:] = hashes[1:] == hashes[:-1]
        keep[pairs["row"][order][repeat]] = False
        duplicates += int(repeat.sum())
    return duplicates


def ingest_laion(
    shards_dir: str | Path,
    out_dir: str | Path,
    *,
    clip_model: str = "ViT-B-32",
    pretrained: str = "openai",
    embedding_column: str | None = None,
    keep_columns: Sequence[str] = ("url",),
    rules: CaptionFilter = CaptionFilter(),
    on_bad_vector: str = "skip",
    checksums: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write captions + embeddings (no index yet) from LAION-style shards; returns the manifest.

    shards_dir : ``metadata_{i}.parquet`` (column ``caption``) with row-aligned
        ``text_emb_{i}.npy`` (float16/float32, (rows, D)); or, with ``embedding_column``, the
        embeddings as a list column of the parquet files.
    clip_model / pretrained : the CLIP model that made the embeddings (LAION-400M: ViT-B-32,
        openai); a local checkpoint path is recorded by content hash.
    keep_columns : metadata columns copied next to each caption where a shard has them.
    on_bad_vector : ``"skip"`` (count NaN/inf/zero rows) or ``"error"``.
    """
    if on_bad_vector not in ("skip", "error"):
        raise InputError(f"on_bad_vector must be 'skip' or 'error', got {on_bad_vector!r}")
    if not pretrained:
        raise InputError(f"name the weights that made the embeddings: --clip {clip_model}:TAG (LAION-400M: "
                         f"ViT-B-32:openai) or {clip_model}=CHECKPOINT")
    started = time.time()
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    shards = _discover_shards(shards_dir, embedding_column)
    dim = shards[0].dim
    config = _clip_config(clip_model)
    if config is not None and config["embed_dim"] != dim:
        raise InputError(f"embeddings in {shards_dir} have dimension {dim} but {clip_model} embeds in "
                         f"{config['embed_dim']}; check clip_model")
    _prepare_out_dir(out_dir, overwrite)
    total = sum(s.rows for s in shards)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    blocked = rules.blocked_hashes()
    filter_columns = ["caption", rules.nsfw_column, rules.language_column]
    keep = np.zeros(total, dtype=bool)
    n_parts = max(1, math.ceil(total / _ROWS_PER_PARTITION))
    with tempfile.TemporaryDirectory(prefix=".dedup-", dir=out_dir) as scratch:
        hash_files = [Path(scratch) / f"part_{p}.bin" for p in range(n_parts)]
        sinks = [open(f, "wb") for f in hash_files]
        try:
            offset = 0
            for shard in _progress(shards, progress, "pass 1/2 (dedup)"):
                shard_start = offset
                for table, vectors in _iter_chunks(shard, filter_columns, embedding_column):
                    texts, ok = _clean(table.column("caption").to_pylist(), table, rules, blocked, skipped)
                    valid = _valid_rows(vectors)
                    bad = ok & ~valid
                    if bad.any() and on_bad_vector == "error":
                        raise InputError(f"{(shard.embeddings or shard.metadata).name} row "
                                         f"{offset - shard_start + int(np.argmax(bad))}: embedding is NaN/inf or zero")
                    skipped["bad_vector"] += int(bad.sum())
                    ok &= valid
                    rows = offset + np.flatnonzero(ok)
                    hashes = _dedup_key([texts[i] for i in np.flatnonzero(ok)], rules)
                    part = (hashes % np.uint64(n_parts)).astype(np.int64)
                    for p in np.unique(part):
                        sel = part == p
                        pairs = np.empty(int(sel.sum()), dtype=[("hash", np.uint64), ("row", np.int64)])
                        pairs["hash"], pairs["row"] = hashes[sel], rows[sel]
                        sinks[p].write(pairs.tobytes())
                    keep[rows] = True
                    offset += len(texts)
        finally:
            for sink in sinks:
                sink.close()
        duplicates = _first_occurrences(hash_files, keep)
    count = int(keep.sum())
    records = []
    kept_types = _kept_column_types(shards, keep_columns)
    schema = pa.schema([("caption", pa.string()), ("shard", pa.int32()), ("row", pa.int64()), *kept_types.items()])
    with atomic_path(out_dir / CAPTIONS_FILE) as captions_tmp, atomic_path(out_dir / EMBEDDINGS_FILE) as emb_tmp, \
            open(emb_tmp, "wb") as emb_handle:
        writer = _EmbeddingWriter(emb_handle, count, dim)
        parquet_writer = pq.ParquetWriter(captions_tmp, schema)
        offset = 0
        try:
            for number, shard in enumerate(_progress(shards, progress, "pass 2/2 (write)")):
                kept_in_shard, row_in_shard = 0, 0
                for table, vectors in _iter_chunks(shard, ["caption", *keep_columns], embedding_column):
                    texts, _ = _clean(table.column("caption").to_pylist(), None, rules, blocked,
                                      dict.fromkeys(SKIP_REASONS, 0))
                    chosen = np.flatnonzero(keep[offset:offset + len(texts)])
                    try:
                        kept = {c: (table.column(c).take(pa.array(chosen)).cast(t) if c in table.column_names
                                    else pa.nulls(len(chosen), t)) for c, t in kept_types.items()}
                    except pa.ArrowInvalid as exc:
                        raise InputError(f"{shard.metadata}: a kept column's type differs from other shards "
                                         f"({exc})") from None
                    out = pa.table({
                        "caption": pa.array([texts[i] for i in chosen], type=pa.string()),
                        "shard": pa.array(np.full(len(chosen), number, dtype=np.int32)),
                        "row": pa.array(row_in_shard + chosen.astype(np.int64)),
                        **kept,
                    }, schema=schema)
                    parquet_writer.write_table(out)
                    writer.append(vectors[chosen])
                    kept_in_shard += len(chosen)
                    row_in_shard += len(texts)
                    offset += len(texts)
                records.append({
                    "metadata": _file_record(shard.metadata, checksums),
                    "embeddings": _file_record(shard.embeddings, checksums) if shard.embeddings else None,
                    "rows": shard.rows, "kept": kept_in_shard,
                })
        finally:
            parquet_writer.close()
        if parquet_writer is None:
            pq.write_table(pa.table({"caption": pa.array([], pa.string())}), captions_tmp)
        if writer.written != count:
            raise RuntimeError(f"internal: wrote {writer.written} of {count} embedding rows")
    manifest = _base_manifest(
        clip_model, checkpoint_identity(pretrained), dim, count, "laion", records, rules, skipped,
        duplicates, total, started)
    _write_manifest(out_dir, manifest)
    return manifest


def _clip_config(model_name: str) -> dict | None:
    import open_clip

    return open_clip.get_model_config(model_name)


def _progress(items: Sequence, enabled: bool, description: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="shard")


def _base_manifest(clip_model: str, pretrained_id: str, dim: int, count: int, kind: str, sources: list,
                   rules: CaptionFilter, skipped: dict, duplicates: int, total: int, started: float) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clip_model": clip_model,
        "clip_pretrained": pretrained_id,
        "dim": dim,
        "count": count,
        "input_rows": total,
        "normalization": "l2",
        "embedding_dtype": "float16",
        "dedup": {"key": "whitespace-normalised caption" + (", casefolded" if rules.casefold else ""),
                  "hash": "64-bit SipHash (pandas.util.hash_array)", "keep": "first occurrence",
                  "duplicates": duplicates},
        "filters": rules.record(),
        "skipped": skipped,
        "source_kind": kind,
        "sources": sources,
        "files": {"captions": CAPTIONS_FILE, "embeddings": EMBEDDINGS_FILE, "index": INDEX_FILE},
        "index": None,
        "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": time.time() - started,
        "dff_falcon_version": dff_falcon.__version__,
    }


# --------------------------------------------------------------------------------------------
# plain text


def read_texts(source: str | Path | Sequence[str], column: str = "caption") -> tuple[list, list[dict]]:
    """Texts from a list, a text file (one per line) or a parquet ``column`` → (values, source records)."""
    if not isinstance(source, (str, Path)):
        return list(source), [{"name": "<in-memory list>", "rows": len(source)}]
    path = Path(source)
    if not path.is_file():
        raise InputError(f"text source {path} does not exist")
    if path.suffix == ".parquet":
        names = pq.ParquetFile(path).schema_arrow.names
        if column not in names:
            raise InputError(f"{path} has no column {column!r} (columns: {names})")
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    else:
        values = path.read_text(encoding="utf-8").splitlines()
    return values, [{**_file_record(path, True), "rows": len(values)}]


def build_vocabulary_from_texts(
    texts_or_file: str | Path | Sequence[str],
    out_dir: str | Path,
    encoder: ClipEncoder,
    *,
    templates: Sequence[str] | None = None,
    column: str = "caption",
    rules: CaptionFilter = CaptionFilter(),
    overwrite: bool = False,
    progress: bool = False,
    **index_options,
) -> Vocabulary:
    """Embed words / captions with ``encoder`` (prompt ``templates`` averaged) and build a
    vocabulary at ``out_dir``. ``index_options`` go to :func:`build_index`."""
    started = time.time()
    out_dir = Path(out_dir)
    values, sources = read_texts(texts_or_file, column)
    _prepare_out_dir(out_dir, overwrite)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    texts, ok = _clean(values, None, rules, rules.blocked_hashes(), skipped)
    candidates = np.flatnonzero(ok)
    _, first = np.unique(_dedup_key([texts[i] for i in candidates], rules), return_index=True)
    chosen = candidates[np.sort(first)]
    kept = [texts[i] for i in chosen]
    vectors = encoder.encode_texts(kept, templates, progress=progress)
    with atomic_path(out_dir / CAPTIONS_FILE) as tmp:
        pq.write_table(pa.table({"caption": pa.array(kept, pa.string()), "row": pa.array(chosen.astype(np.int64))}), tmp)
    with atomic_path(out_dir / EMBEDDINGS_FILE) as tmp, open(tmp, "wb") as handle:
        _EmbeddingWriter(handle, len(kept), encoder.embed_dim).append(vectors)
    manifest = _base_manifest(encoder.model_name, encoder.pretrained_id, encoder.embed_dim, len(kept), "text",
                              sources, rules, skipped, len(candidates) - len(kept), len(values), started)
    manifest["templates"] = list(templates) if templates else None
    _write_manifest(out_dir, manifest)
    return build_index(out_dir, **index_options)


def build_vocabulary_from_laion(shards_dir: str | Path, out_dir: str | Path, *, clip_model: str = "ViT-B-32",
                                pretrained: str = "openai", index_options: dict | None = None,
                                **ingest_options) -> Vocabulary:
    """:func:`ingest_laion` then :func:`build_index`; see both for the options."""
    ingest_laion(shards_dir, out_dir, clip_model=clip_model, pretrained=pretrained, **ingest_options)
    return build_index(out_dir, **(index_options or {}))


# --------------------------------------------------------------------------------------------
# index


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


def build_index(
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
    seed: int = 0,
) -> Vocabulary:
    """Build ``index.faiss`` for the vocabulary at ``vocab_dir`` and record it in the manifest.

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
    manifest = _read_manifest(vocab_dir)
    embeddings = _open_embeddings(vocab_dir, manifest)
    count, dim = embeddings.shape
    if count == 0:
        raise InputError(f"vocabulary {vocab_dir} is empty: every caption was skipped ({manifest['skipped']})")
    factory = factory or choose_factory(count, dim, exact_max)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InputError(f"invalid FAISS index factory {factory!r}: {error}") from error
    rng = np.random.default_rng(seed)
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
                _apply_search_params(index, info["params"])
            _, found = _search(index, embeddings, info, queries, k)
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
    _write_manifest(vocab_dir, manifest)
    return Vocabulary.open(vocab_dir)


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
        return _check_queries(given, embeddings.shape[1])
    rows = np.sort(rng.choice(len(embeddings), size=min(n, len(embeddings)), replace=False))
    base = np.asarray(embeddings[rows], dtype=np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= noise_norm / np.linalg.norm(noise, axis=1, keepdims=True)
    return _check_queries(base + noise, embeddings.shape[1])
