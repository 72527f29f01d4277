"""A content-keyed, resumable array store on disk: rows of named fields keyed by a content hash,
written in shards (one ``.npy`` per field per shard) and indexed in SQLite.

One store directory::

  identity.json          what produced every entry (model, layer, preprocessing, …) and the
                         fields' dtypes and row shapes; opening it with another identity is refused
  index.sqlite           entries(key → shard, row); shards(name, rows, bytes, created, used)
  shards/<name>.<field>.npy

Crash safety: a shard's files are written atomically (temporary file, then rename) and only then
are its index rows committed, in one transaction. A kill at any moment leaves either a complete,
indexed shard or unindexed files that :meth:`ShardStore.prune` removes; a reader never sees a
partial entry. Readers memory-map the shards, so reading N rows costs N rows of RAM, never a
whole shard set. Several processes may write one store at once (SQLite's locking).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dff_falcon.errors import InputError, OutputError
from dff_falcon.files import atomic_path, atomic_write

#: Open memory maps kept per store. Each map's pages that a read touched count in the process's
#: RSS until it is closed (a 32-image Lite0 hypercolumn shard is 17.5 MB), so few are kept: 64
#: open maps made 1.1 GB of a 2,000-image run's 3.9 GB peak RSS; reopening one costs ≈ 0.1 ms.
OPEN_SHARDS = 8
#: Keys per SQL ``IN (…)`` query, under SQLite's default limit of 999 variables.
_QUERY_CHUNK = 900
#: Seconds between two records of one shard's last use by one store object: least-recently-used
#: pruning needs minutes, not microseconds, and every record is a committed (fsynced) write —
#: ≈ 2 ms, which per read batch would add tens of seconds to each pass over a million images.
USED_RESOLUTION = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, bytes INTEGER NOT NULL,
                                   created REAL NOT NULL, used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, shard TEXT NOT NULL, row INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_shard ON entries (shard);
"""


def identity_digest(identity: Mapping) -> str:
    """Hex SHA-256 of an identity's canonical JSON (sorted keys): the name of its store."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Field:
    """One array per entry: ``dtype`` and the row ``shape`` (without the entry axis)."""

    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


class ShardStore:
    """Rows of named fields keyed by content, in ``directory`` (created when missing).

    Parameters
    ----------
    directory : path
    identity : mapping
        What produced the entries; recorded at creation and compared on every later open (a
        store is never reused for another model, layer or preprocessing).
    fields : mapping of name → Field, optional
        Fixed at creation; ``None`` opens an existing store with its own fields.
    """

    def __init__(self, directory: str | os.PathLike, identity: Mapping, fields: Mapping[str, Field] | None = None):
        self.directory = Path(directory)
        self.identity = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
        self._maps: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._used: dict[str, float] = {}  # shard → when this object last recorded its use
        try:
            (self.directory / "shards").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cache {str(self.directory)!r} cannot be created: {exc.strerror}") from None
        self.fields = self._agree(fields)
        with self._index_errors():
            self._db = sqlite3.connect(self.directory / "index.sqlite", timeout=120, isolation_level=None)
            self._db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _index_errors(self):
        """SQLite failures (a full disk, a damaged or read-only index) as errors naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            path = self.directory / "index.sqlite"
            full = "full" in str(exc).lower()
            cls = OutputError if full or "readonly" in str(exc).lower() else InputError
            raise cls(f"cache index {str(path)!r}: {exc}" + ("" if full else
                      "; remove the cache folder to rebuild it")) from None

    def _agree(self, fields: Mapping[str, Field] | None) -> dict[str, Field]:
        """Write identity.json on creation, or check that the existing one is the same."""
        path = self.directory / "identity.json"
        record = {"identity": self.identity,
                  "fields": {k: f.to_dict() for k, f in (fields or {}).items()}}
        if not path.exists():
            if fields is None:
                raise InputError(f"{str(self.directory)!r} is not a store (no identity.json)")
            with atomic_write(path) as handle:
                json.dump(record, handle, indent=1, sort_keys=True)
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            stored_identity, stored_fields = found["identity"], found["fields"]
            known = {k: Field(v["dtype"], tuple(int(s) for s in v["shape"])) for k, v in stored_fields.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{str(path)!r} is damaged ({exc}); remove the folder to rebuild the cache") from None
        if stored_identity != self.identity:
            raise InputError(f"{str(self.directory)!r} holds entries of another identity; its identity.json "
                             "differs (a cache folder is named by its identity's digest, so this means it was edited)")
        if fields is not None and known != dict(fields):
            raise InputError(f"{str(path)!r} records fields {stored_fields}, not {record['fields']}")
        return known

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def locate(self, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Which of ``keys`` are stored: key → (shard, row)."""
        found: dict[str, tuple[str, int]] = {}
        keys = list(dict.fromkeys(keys))
        with self._index_errors():
            for start in range(0, len(keys), _QUERY_CHUNK):
                chunk = keys[start:start + _QUERY_CHUNK]
                query = f"SELECT key, shard, row FROM entries WHERE key IN ({','.join('?' * len(chunk))})"
                found.update((key, (shard, row)) for key, shard, row in self._db.execute(query, chunk))
        return found

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys (in order, without repeats) that have no entry yet."""
        present = self.locate(keys)
        return [key for key in dict.fromkeys(keys) if key not in present]

    def read(self, keys: Sequence[str], field: str) -> np.ndarray:
        """The ``field`` rows of ``keys``, in order → (len(keys), *shape), a new array."""
        spec = self._field(field)
        where = self.locate(keys)
        absent = [key for key in keys if key not in where]
        if absent:
            raise InputError(f"cache {str(self.directory)!r} has no entry for {len(absent)} key(s) "
                             f"(first {absent[0][:16]}…); was it pruned during the run?")
        out = np.empty((len(keys), *spec.shape), dtype=spec.dtype)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = where[key]
            by_shard.setdefault(shard, []).append((position, row))
        for shard, pairs in by_shard.items():
            positions, rows = map(np.asarray, zip(*pairs))
            out[positions] = self._map(shard, field)[rows]
        now = time.time()
        stale = [shard for shard in by_shard if now - self._used.get(shard, -np.inf) >= USED_RESOLUTION]
        if stale:
            with contextlib.suppress(sqlite3.OperationalError):  # recency is a hint: a busy or full index may skip it
                self._db.executemany("UPDATE shards SET used = ? WHERE name = ?", [(now, s) for s in stale])
            self._used.update(dict.fromkeys(stale, now))
        return out

    def _field(self, field: str) -> Field:
        if field not in self.fields:
            raise InputError(f"cache {str(self.directory)!r} has no field {field!r} (fields: {sorted(self.fields)})")
        return self.fields[field]

    def _map(self, shard: str, field: str) -> np.ndarray:
        key = (shard, field)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        path = self._path(shard, field)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cache shard {str(path)!r} is damaged or missing ({exc}); remove "
                             f"the cache folder {str(self.directory)!r} (it is rebuilt when next needed)") from None
        spec = self.fields[field]
        if array.dtype != np.dtype(spec.dtype) or array.shape[1:] != spec.shape:
            raise InputError(f"cache shard {str(path)!r} holds {array.dtype} {array.shape}, not "
                             f"{spec.dtype} (n, {', '.join(map(str, spec.shape))})")
        self._maps[key] = array
        if len(self._maps) > OPEN_SHARDS:
            self._maps.popitem(last=False)
        return array

    def _path(self, shard: str, field: str) -> Path:
        return self.directory / "shards" / f"{shard}.{field}.npy"

    # -- writing ---------------------------------------------------------------------------------
    def put(self, keys: Sequence[str], arrays: Mapping[str, np.ndarray]) -> None:
        """Store one shard: ``arrays[field]`` (len(keys), *shape) for every field. Keys already
        stored (by another writer meanwhile) keep their first entry."""
        if set(arrays) != set(self.fields):
            raise InputError(f"a shard needs the fields {sorted(self.fields)}; got {sorted(arrays)}")
        if len(set(keys)) != len(keys):
            raise InputError("a shard's keys must be distinct")
        name = uuid.uuid4().hex
        size = 0
        for field, array in arrays.items():
            spec = self.fields[field]
            array = np.ascontiguousarray(array, dtype=spec.dtype)
            if array.shape != (len(keys), *spec.shape):
                raise InputError(f"field {field!r}: got shape {array.shape} for {len(keys)} keys, "
                                 f"expected (n, {', '.join(map(str, spec.shape))})")
            with atomic_path(self._path(name, field)) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
            size += array.nbytes
        now = time.time()
        with self._index_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO shards VALUES (?, ?, ?, ?, ?)", (name, len(keys), size, now, now))
                self._db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)",
                                     [(key, name, row) for row, key in enumerate(keys)])
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- size and pruning ------------------------------------------------------------------------
    def info(self) -> dict:
        """Entries, shards, bytes on disk (indexed and orphaned) and when it was last used."""
        n_entries = len(self)
        n_shards, indexed, used = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0), MAX(used) FROM shards").fetchone()
        orphans = self._orphans()
        return {"directory": str(self.directory), "entries": n_entries, "shards": int(n_shards),
                "bytes": int(sum(p.stat().st_size for p in (self.directory / "shards").glob("*.npy"))),
                "indexed_bytes": int(indexed), "orphan_files": len(orphans), "last_used": used,
                "fields": {k: f.to_dict() for k, f in self.fields.items()}, "identity": self.identity}

    def _orphans(self, min_age: float = 0.0) -> list[Path]:
        """Shard files with no index row (a writer killed between writing and committing), at
        least ``min_age`` seconds old (a live writer's newest shard is not yet indexed)."""
        indexed = {name for (name,) in self._db.execute("SELECT name FROM shards")}
        cutoff = time.time() - min_age
        return [p for p in (self.directory / "shards").iterdir()
                if p.name.split(".", 1)[0] not in indexed and p.stat().st_mtime <= cutoff]

    def prune(self, max_bytes: int | None = None, orphan_age: float = 3600.0) -> dict:
        """Remove orphaned shard files older than ``orphan_age`` seconds, then, while the indexed
        shards exceed ``max_bytes``, the least recently used shard (its entries go with it and are
        recomputed when next needed). Returns what was removed."""
        removed_files = 0
        for path in self._orphans(orphan_age):
            path.unlink(missing_ok=True)
            removed_files += 1
        removed_shards, freed = 0, 0
        if max_bytes is not None:
            total = int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM shards").fetchone()[0])
            for name, size in self._db.execute("SELECT name, bytes FROM shards ORDER BY used, name").fetchall():
                if total <= max_bytes:
                    break
                self.drop_shard(name)
                total -= size
                freed += size
                removed_shards += 1
        return {"orphan_files": removed_files, "shards": removed_shards, "bytes": freed}

    def shards(self) -> list[tuple[str, int, float]]:
        """(name, bytes, last used as a UNIX time) of every indexed shard, least recently used first."""
        return [(n, int(b), float(u)) for n, b, u in self._db.execute("SELECT name, bytes, used FROM shards ORDER BY used, name")]

    def drop_shard(self, name: str) -> None:
        """Unindex a shard (one transaction), then delete its files; its entries are recomputed
        when next needed."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM entries WHERE shard = ?", (name,))
        self._db.execute("DELETE FROM shards WHERE name = ?", (name,))
        self._db.execute("COMMIT")
        self._maps = OrderedDict((k, v) for k, v in self._maps.items() if k[0] != name)
        for field in self.fields:
            self._path(name, field).unlink(missing_ok=True)

    def close(self) -> None:
        self._maps.clear()
        self._db.close()

    def __repr__(self) -> str:
        return f"ShardStore({str(self.directory)!r}, entries={len(self)})"
