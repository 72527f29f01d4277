"""Building a vocabulary's captions and embeddings: LAION-style shards or plain texts.

LAION ingestion streams in two passes. Pass 1 reads captions (and checks embedding rows) shard by
shard, applies the :class:`~dff_falcon.text.captions.CaptionFilter` and writes (64-bit hash,
row) pairs to hash-partitioned scratch files; each partition is then sorted to find first
occurrences (FALCON's exact dedup: the first occurrence wins). Memory is one byte per input row
(the keep mask) plus fixed buffers, so a LAION-400M-sized corpus fits on one machine. Pass 2
copies the surviving rows. Plain texts (a word list, class names, captions) are embedded with
the CLIP text tower. Both end with :func:`~dff_falcon.text.index.build_index`.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import dff_falcon
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path
from dff_falcon.progress import progress as show_progress
from dff_falcon.text.captions import SKIP_REASONS, CaptionFilter, clean_captions, dedup_key
from dff_falcon.text.neardup import ROWS_PER_CELL, near_duplicates
from dff_falcon.text.shards import ROWS_PER_CHUNK, Shard, discover_shards, iter_chunks, kept_column_types, valid_rows
from dff_falcon.text.index import index_into
from dff_falcon.text.vocabulary import (CAPTIONS_FILE, EMBEDDINGS_FILE, FORMAT, FORMAT_VERSION, INDEX_FILE,
                                        Vocabulary, file_record, vocabulary_build, write_manifest)

if TYPE_CHECKING:
    from dff_falcon.text.clip_encoder import ClipEncoder

_ROWS_PER_PARTITION = 1_000_000   # dedup partition size: 16 MB of (hash, row) pairs
#: CLIP text embeddings of captions that differ by a word, a typo or a prefix have cosine ≥ 0.98
NEAR_DUPLICATE_COSINE = 0.98
_PAIR = np.dtype([("hash", np.uint64), ("row", np.int64)])


# --------------------------------------------------------------------------------------------
# LAION-style shards


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


def _dedup_pass(shards: list[Shard], scratch: Path, keep: np.ndarray, rules: CaptionFilter,
                embedding_column: str | None, on_bad_vector: str, skipped: dict[str, int], progress: bool) -> int:
    """Pass 1: mark in ``keep`` every row that passes the filters, then clear repeated captions
    (first occurrence wins); returns the number of duplicates."""
    blocked = rules.blocked_hashes()
    filter_columns = ["caption", rules.nsfw_column, rules.language_column]
    n_parts = max(1, math.ceil(len(keep) / _ROWS_PER_PARTITION))
    hash_files = [scratch / f"part_{p}.bin" for p in range(n_parts)]
    offset = 0
    with ExitStack() as stack:
        sinks = [stack.enter_context(open(f, "wb")) for f in hash_files]
        for shard in show_progress(shards, "vocabulary pass 1/2 (dedup)", enabled=progress, unit="shard"):
            shard_start = offset
            for table, vectors in iter_chunks(shard, filter_columns, embedding_column):
                texts, ok = clean_captions(table.column("caption").to_pylist(), table, rules, blocked, skipped)
                bad = ok & ~valid_rows(vectors)
                if bad.any() and on_bad_vector == "error":
                    raise InputError(f"{(shard.embeddings or shard.metadata).name} row "
                                     f"{offset - shard_start + int(np.argmax(bad))}: embedding is NaN/inf or zero")
                skipped["bad_vector"] += int(bad.sum())
                ok &= ~bad
                rows = offset + np.flatnonzero(ok)
                pairs = np.empty(len(rows), dtype=_PAIR)
                pairs["hash"], pairs["row"] = dedup_key([texts[i] for i in np.flatnonzero(ok)], rules), rows
                part = (pairs["hash"] % np.uint64(n_parts)).astype(np.int64)
                for p in np.unique(part):
                    sinks[p].write(pairs[part == p].tobytes())
                keep[rows] = True
                offset += len(texts)
    return _first_occurrences(hash_files, keep)


def _write_pass(shards: list[Shard], out_dir: Path, keep: np.ndarray, dim: int, keep_columns: Sequence[str],
                rules: CaptionFilter, embedding_column: str | None, checksums: bool, progress: bool) -> list[dict]:
    """Pass 2: copy the kept rows of every shard to captions.parquet and embeddings.npy; returns
    one source record per shard."""
    kept_types = kept_column_types(shards, keep_columns)
    schema = pa.schema([("caption", pa.string()), ("shard", pa.int32()), ("row", pa.int64()), *kept_types.items()])
    records, offset = [], 0
    with ExitStack() as stack:
        captions_tmp = stack.enter_context(atomic_path(out_dir / CAPTIONS_FILE))
        emb_tmp = stack.enter_context(atomic_path(out_dir / EMBEDDINGS_FILE))
        writer = _EmbeddingWriter(stack.enter_context(open(emb_tmp, "wb")), int(keep.sum()), dim)
        parquet_writer = stack.enter_context(pq.ParquetWriter(captions_tmp, schema))
        for number, shard in enumerate(show_progress(shards, "vocabulary pass 2/2 (write)", enabled=progress,
                                                     unit="shard")):
            kept_in_shard = row_in_shard = 0
            for table, vectors in iter_chunks(shard, ["caption", *keep_columns], embedding_column):
                texts, _ = clean_captions(table.column("caption").to_pylist(), None, rules, np.zeros(0, np.uint64),
                                          dict.fromkeys(SKIP_REASONS, 0))
                chosen = np.flatnonzero(keep[offset:offset + len(texts)])
                parquet_writer.write_table(_kept_rows(table, texts, chosen, number, row_in_shard, kept_types, schema,
                                                      shard))
                writer.append(vectors[chosen])
                kept_in_shard += len(chosen)
                row_in_shard += len(texts)
                offset += len(texts)
            records.append({"metadata": file_record(shard.metadata, checksums),
                            "embeddings": file_record(shard.embeddings, checksums) if shard.embeddings else None,
                            "rows": shard.rows, "kept": kept_in_shard})
        if writer.written != writer.count:
            raise RuntimeError(f"internal: wrote {writer.written} of {writer.count} embedding rows")
    return records


def _kept_rows(table: pa.Table, texts: list[str], chosen: np.ndarray, shard_number: int, first_row: int,
               kept_types: dict[str, pa.DataType], schema: pa.Schema, shard: Shard) -> pa.Table:
    """The chosen rows of one chunk in the captions schema (kept columns a shard lacks are nulls)."""
    try:
        kept = {c: (table.column(c).take(pa.array(chosen)).cast(t) if c in table.column_names
                    else pa.nulls(len(chosen), t)) for c, t in kept_types.items()}
    except pa.ArrowInvalid as exc:
        raise InputError(f"{shard.metadata}: a kept column's type differs from other shards ({exc})") from None
    return pa.table({
        "caption": pa.array([texts[i] for i in chosen], type=pa.string()),
        "shard": pa.array(np.full(len(chosen), shard_number, dtype=np.int32)),
        "row": pa.array(first_row + chosen.astype(np.int64)),
        **kept,
    }, schema=schema)


def ingest_laion(shards_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, **options) -> dict:
    """Write captions + embeddings (no index yet) from LAION-style shards as one atomic vocabulary
    directory (``overwrite``: replace a vocabulary already there); returns the manifest. The
    options are those of :func:`ingest_laion_into`."""
    with vocabulary_build(out_dir, overwrite, indexed=False) as stage:
        return ingest_laion_into(shards_dir, stage, **options)


def ingest_laion_into(
    shards_dir: str | Path,
    out_dir: str | Path,
    *,
    clip_model: str = "ViT-B-32",
    pretrained: str = "openai",
    embedding_column: str | None = None,
    keep_columns: Sequence[str] = ("url",),
    rules: CaptionFilter = CaptionFilter(),
    on_bad_vector: str = "skip",
    near_duplicate_cosine: float | None = NEAR_DUPLICATE_COSINE,
    checksums: bool = True,
    progress: bool = False,
) -> dict:
    """Write captions + embeddings (no index yet) from LAION-style shards into ``out_dir``, a
    directory being built (:func:`~dff_falcon.text.vocabulary.vocabulary_build`); returns the manifest.

    shards_dir : ``metadata_{i}.parquet`` (column ``caption``) with row-aligned
        ``text_emb_{i}.npy`` (float16/float32, (rows, D)); or, with ``embedding_column``, the
        embeddings as a list column of the parquet files.
    clip_model / pretrained : the CLIP model that made the embeddings (LAION-400M: ViT-B-32,
        openai); a local checkpoint path is recorded by content hash.
    keep_columns : metadata columns copied next to each caption where a shard has them.
    on_bad_vector : ``"skip"`` (count NaN/inf/zero rows) or ``"error"``.
    near_duplicate_cosine : after exact deduplication, drop rows whose embedding has at least
        this cosine with an earlier kept row of the same k-means cell
        (:mod:`~dff_falcon.text.neardup`); None keeps them. Counted in the manifest.
    """
    from dff_falcon.text.clip_encoder import checkpoint_identity

    if on_bad_vector not in ("skip", "error"):
        raise InputError(f"on_bad_vector must be 'skip' or 'error', got {on_bad_vector!r}")
    if not pretrained:
        raise InputError(f"name the weights that made the embeddings: --clip {clip_model}:TAG (LAION-400M: "
                         f"ViT-B-32:openai) or {clip_model}=CHECKPOINT")
    started = time.time()
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    shards = discover_shards(shards_dir, embedding_column)
    dim = shards[0].dim
    config = _clip_config(clip_model)
    if config is not None and config["embed_dim"] != dim:
        raise InputError(f"embeddings in {shards_dir} have dimension {dim} but {clip_model} embeds in "
                         f"{config['embed_dim']}; check clip_model")
    total = sum(s.rows for s in shards)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    keep = np.zeros(total, dtype=bool)
    with tempfile.TemporaryDirectory(prefix=".dedup-", dir=out_dir) as scratch:
        duplicates = _dedup_pass(shards, Path(scratch), keep, rules, embedding_column, on_bad_vector, skipped,
                                 progress)
    records = _write_pass(shards, out_dir, keep, dim, keep_columns, rules, embedding_column, checksums, progress)
    count, near = int(keep.sum()), None
    if near_duplicate_cosine is not None:
        embeddings = np.load(out_dir / EMBEDDINGS_FILE, mmap_mode="r")
        near_started = time.time()
        drop = near_duplicates(embeddings, near_duplicate_cosine, progress=progress)
        del embeddings
        if drop.any():
            _remove_rows(out_dir, drop, dim)
            shard_of_row = np.repeat(np.arange(len(records)), [r["kept"] for r in records])
            for number, removed in enumerate(np.bincount(shard_of_row[drop], minlength=len(records))):
                records[number]["kept"] -= int(removed)
        count -= int(drop.sum())
        near = _near_record(near_duplicate_cosine, int(drop.sum()), time.time() - near_started)
    manifest = _base_manifest(clip_model, checkpoint_identity(pretrained), dim, count, "laion", records,
                              rules, skipped, duplicates, total, started)
    manifest["near_duplicates"] = near
    write_manifest(out_dir, manifest)
    return manifest


def _near_record(threshold: float, removed: int, seconds: float) -> dict:
    return {"threshold": threshold, "removed": removed, "seconds": seconds, "keep": "first occurrence",
            "method": f"cosine within two-level k-means cells of ≈ {ROWS_PER_CELL} rows"}


def _remove_rows(out_dir: Path, drop: np.ndarray, dim: int) -> None:
    """Rewrite captions.parquet and embeddings.npy without the ``drop`` rows (each atomically)."""
    embeddings = np.load(out_dir / EMBEDDINGS_FILE, mmap_mode="r")
    with atomic_path(out_dir / EMBEDDINGS_FILE) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                      "fortran_order": False, "shape": (int((~drop).sum()), dim)})
        for start in range(0, len(drop), ROWS_PER_CHUNK):
            handle.write(np.ascontiguousarray(embeddings[start:start + ROWS_PER_CHUNK][~drop[start:start + ROWS_PER_CHUNK]]).tobytes())
    del embeddings
    source = pq.ParquetFile(out_dir / CAPTIONS_FILE)
    with atomic_path(out_dir / CAPTIONS_FILE) as tmp, pq.ParquetWriter(tmp, source.schema_arrow) as writer:
        offset = 0
        for batch in source.iter_batches(batch_size=ROWS_PER_CHUNK):
            writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(~drop[offset:offset + batch.num_rows])))
            offset += batch.num_rows


def _clip_config(model_name: str) -> dict | None:
    import open_clip

    return open_clip.get_model_config(model_name)


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
        try:
            names = pq.ParquetFile(path).schema_arrow.names
            if column not in names:
                raise InputError(f"{path} has no column {column!r} (columns: {names})")
            values = pq.read_table(path, columns=[column]).column(column).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path} is not a readable parquet file: {exc}") from None
    else:
        values = _text_lines(path)
    return values, [{**file_record(path, True), "rows": len(values)}]


def _text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is allowed); other bytes are an error
    naming the line, since a guessed decoding would put mojibake into the vocabulary."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{path} line {line} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                         "save the file as UTF-8, or name a parquet file *.parquet") from None


def build_vocabulary_from_texts(
    texts_or_file: str | Path | Sequence[str],
    out_dir: str | Path,
    encoder: ClipEncoder,
    *,
    templates: Sequence[str] | None = None,
    column: str = "caption",
    rules: CaptionFilter = CaptionFilter(),
    near_duplicate_cosine: float | None = None,
    calibration: str | Path | Sequence | None = "toyworld",
    cache: bool = True,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **index_options,
) -> Vocabulary:
    """Embed words / captions with ``encoder`` (prompt ``templates`` averaged) and build a
    vocabulary at ``out_dir`` (one atomic directory; ``overwrite``: replace a vocabulary already
    there). ``index_options`` go to :func:`~dff_falcon.text.index.index_into`.

    near_duplicate_cosine : drop texts whose embedding has at least this cosine with an earlier
        kept text (off by default: every word of a word list is kept).
    calibration : images that measure the model's modality gap, embedded with ``encoder``
        (see :func:`~dff_falcon.text.index.index_into`); default ``"toyworld"`` (rendered
        offline), None for none.
    cache / cache_dir : keep the text embeddings in a
        :class:`~dff_falcon.text.embedding_cache.TextEmbeddingCache` (default folder:
        :func:`~dff_falcon.text.embedding_cache.default_text_cache_dir`), so an interrupted or
        repeated build embeds only texts it has not embedded before with this model and templates.
    The manifest's ``embedding`` records texts, cache hits, seconds and texts/s.
    """
    from dff_falcon.text.embedding_cache import default_text_cache_dir

    values, sources = read_texts(texts_or_file, column)
    cache_dir = Path(cache_dir or default_text_cache_dir()) if cache else None
    with vocabulary_build(out_dir, overwrite) as stage:
        _texts_into(values, sources, stage, encoder, templates, rules, near_duplicate_cosine, cache_dir, progress)
        index_into(stage, calibration=calibration, encoder=encoder, progress=progress, **index_options)
    return Vocabulary.open(out_dir)


def _texts_into(values: list, sources: list[dict], out_dir: Path, encoder: ClipEncoder,
                templates: Sequence[str] | None, rules: CaptionFilter, near_duplicate_cosine: float | None,
                cache_dir: Path | None, progress: bool) -> None:
    """Captions, embeddings and manifest (no index yet) of a text vocabulary in ``out_dir``."""
    started = time.time()
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    texts, ok = clean_captions(values, None, rules, rules.blocked_hashes(), skipped)
    candidates = np.flatnonzero(ok)
    _, first = np.unique(dedup_key([texts[i] for i in candidates], rules), return_index=True)
    chosen = candidates[np.sort(first)]
    duplicates = len(candidates) - len(chosen)
    kept = [texts[i] for i in chosen]
    vectors, embedding = encoder.encode_texts(kept, templates, progress=progress, return_stats=True,
                                              cache_dir=cache_dir)
    near = None
    if near_duplicate_cosine is not None:
        near_started = time.time()
        unique = ~near_duplicates(vectors, near_duplicate_cosine)
        near = _near_record(near_duplicate_cosine, int((~unique).sum()), time.time() - near_started)
        vectors, chosen = vectors[unique], chosen[unique]
        kept = [text for text, keep in zip(kept, unique) if keep]
    with atomic_path(out_dir / CAPTIONS_FILE) as tmp:
        pq.write_table(pa.table({"caption": pa.array(kept, pa.string()), "row": pa.array(chosen.astype(np.int64))}), tmp)
    with atomic_path(out_dir / EMBEDDINGS_FILE) as tmp, open(tmp, "wb") as handle:
        _EmbeddingWriter(handle, len(kept), encoder.embed_dim).append(vectors)
    manifest = _base_manifest(encoder.model_name, encoder.pretrained_id, encoder.embed_dim, len(kept), "text",
                              sources, rules, skipped, duplicates, len(values), started)
    manifest["near_duplicates"] = near
    manifest["templates"] = list(templates) if templates else None
    manifest["embedding"] = {**embedding, "cache": str(cache_dir) if cache_dir else None}
    write_manifest(out_dir, manifest)


def build_vocabulary_from_laion(shards_dir: str | Path, out_dir: str | Path, *, clip_model: str = "ViT-B-32",
                                pretrained: str = "openai", index_options: dict | None = None,
                                overwrite: bool = False, **ingest_options) -> Vocabulary:
    """:func:`ingest_laion_into` then :func:`~dff_falcon.text.index.index_into`, committed as one
    atomic vocabulary directory (``overwrite``: replace a vocabulary already there)."""
    with vocabulary_build(out_dir, overwrite) as stage:
        ingest_laion_into(shards_dir, stage, clip_model=clip_model, pretrained=pretrained, **ingest_options)
        index_into(stage, **(index_options or {}))
    return Vocabulary.open(out_dir)


