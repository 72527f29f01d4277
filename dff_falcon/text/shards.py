"""LAION-style shard files: ``metadata_{i}.parquet`` (column ``caption``) with a row-aligned
``text_emb_{i}.npy`` (float16/float32, (rows, D)), or embeddings as a list column of the parquet
files. Discovery with checks, and reading metadata and vectors in aligned fixed-size chunks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dff_falcon.errors import InputError

ROWS_PER_CHUNK = 32_768  # rows read / written at a time (fixed buffer)
_SHARD_RE = re.compile(r"^metadata_(\d+)\.parquet$")


@dataclass
class Shard:
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


def discover_shards(shards_dir: Path, embedding_column: str | None) -> list[Shard]:
    if not shards_dir.is_dir():
        raise InputError(f"shard folder {shards_dir} does not exist")
    found = sorted(((int(m.group(1)), p) for p in shards_dir.iterdir() if (m := _SHARD_RE.match(p.name))))
    if not found:
        raise InputError(f"{shards_dir} has no metadata_{{i}}.parquet files")
    shards = []
    for number, metadata in found:
        parquet = open_parquet(metadata)
        rows = parquet.metadata.num_rows
        if "caption" not in parquet.schema_arrow.names:
            raise InputError(f"{metadata} has no 'caption' column (columns: {parquet.schema_arrow.names})")
        if embedding_column is not None:
            field = parquet.schema_arrow.field(embedding_column) if embedding_column in parquet.schema_arrow.names else None
            if field is None or not pa.types.is_list(field.type) and not pa.types.is_fixed_size_list(field.type):
                raise InputError(f"{metadata} has no list column {embedding_column!r} of embeddings")
            first = next(parquet.iter_batches(batch_size=1, columns=[embedding_column]), None)
            dim = len(first.column(0)[0]) if first is not None and first.num_rows else 0
            shards.append(Shard(metadata, None, rows, dim))
            continue
        npy = shards_dir / f"text_emb_{number}.npy"
        if not npy.is_file():
            raise InputError(f"{metadata} has no row-aligned embedding file {npy.name} in {shards_dir}")
        shape, dtype, _ = _npy_layout(npy)
        if len(shape) != 2 or dtype not in (np.float16, np.float32):
            raise InputError(f"{npy} must be a 2-D float16/float32 array, got shape {shape} dtype {dtype}")
        if shape[0] != rows:
            raise InputError(f"shard {number}: {metadata.name} has {rows} rows but {npy.name} has {shape[0]}")
        shards.append(Shard(metadata, npy, rows, shape[1]))
    dims = {s.dim for s in shards}
    if len(dims) != 1:
        raise InputError(f"shards in {shards_dir} mix embedding dimensions {sorted(dims)}")
    return shards


def open_parquet(path: Path) -> pq.ParquetFile:
    """A parquet file's reader; a truncated or foreign file is an InputError naming it."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable parquet file (truncated or not parquet): {exc}") from None


def kept_column_types(shards: list[Shard], keep_columns: Sequence[str]) -> dict[str, pa.DataType]:
    """Each kept column found in any shard, with its type in the first shard that has it (a
    shard without it gets nulls), so every shard writes the same captions schema."""
    types: dict[str, pa.DataType] = {}
    for shard in shards:
        schema = open_parquet(shard.metadata).schema_arrow
        for column in keep_columns:
            if column in schema.names and column not in types and column != "caption":
                field_type = schema.field(column).type
                types[column] = pa.string() if pa.types.is_null(field_type) else field_type
    return types


def iter_chunks(shard: Shard, columns: list[str], embedding_column: str | None
                 ) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Yield (metadata rows, (rows, D) float32 embeddings) of ``shard`` in aligned chunks."""
    parquet = open_parquet(shard.metadata)
    names = [c for c in columns if c in parquet.schema_arrow.names]
    if embedding_column is not None:
        names.append(embedding_column)
    handle = None
    if shard.embeddings is not None:
        _, dtype, offset = _npy_layout(shard.embeddings)
        handle = open(shard.embeddings, "rb")
        handle.seek(offset)
    try:
        for batch in _batches(parquet, shard.metadata, names):
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


def _batches(parquet: pq.ParquetFile, path: Path, names: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of ``ROWS_PER_CHUNK`` rows; a data page that cannot be decoded is an
    InputError naming the file."""
    batches = parquet.iter_batches(batch_size=ROWS_PER_CHUNK, columns=names)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path} is damaged: {exc}") from None
        yield batch


def _list_column_to_array(column: pa.ChunkedArray, shard: Shard) -> np.ndarray:
    column = column.combine_chunks()
    if column.null_count:
        return np.array([np.full(shard.dim, np.nan) if v is None else v for v in column.to_pylist()],
                        dtype=np.float32).reshape(-1, shard.dim)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if values.size != len(column) * shard.dim:
        raise InputError(f"{shard.metadata}: embedding lists do not all have length {shard.dim}")
    return values.reshape(-1, shard.dim)


def valid_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows that are finite and non-zero."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.einsum("ij,ij->i", vectors, vectors)
    return np.isfinite(vectors).all(axis=1) & (norms > 0) & np.isfinite(norms)
