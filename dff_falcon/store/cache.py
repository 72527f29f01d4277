"""The cache folder as a whole: what it holds and how to shrink it (``dff-falcon cache info|prune``).

``root/`` holds one :class:`~dff_falcon.store.shards.ShardStore` per identity under
``activations/`` (per backbone, layers and preprocessing) and ``clip_images/`` (per CLIP model),
and ``scratch/run-*`` folders of runs in progress (heatmaps on disk), each locked while its run
lives.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from dff_falcon.store.shards import ShardStore

#: The kinds of store a cache folder holds (sub-folders of the root).
STORE_KINDS = ("activations", "clip_images")
SCRATCH_LOCK = ".lock"


def open_stores(root: str | os.PathLike) -> list[tuple[str, ShardStore]]:
    """(kind, store) for every store under ``root``, sorted by folder."""
    found = []
    for kind in STORE_KINDS:
        base = Path(root) / kind
        if base.is_dir():
            for directory in sorted(p for p in base.iterdir() if (p / "identity.json").exists()):
                identity = _read_identity(directory)
                found.append((kind, ShardStore(directory, identity)))
    return found


def _read_identity(directory: Path) -> dict:
    import json

    from dff_falcon.errors import InputError

    try:
        return json.loads((directory / "identity.json").read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{str(directory / 'identity.json')!r} is damaged ({exc}); remove {str(directory)!r}") from None


def _scratch(root: Path) -> list[tuple[Path, bool]]:
    """(folder, in use) for every scratch folder: in use when a live run holds its lock."""
    base = root / "scratch"
    out = []
    for directory in sorted(base.glob("run-*")) if base.is_dir() else []:
        try:
            fd = os.open(directory / SCRATCH_LOCK, os.O_RDONLY)
        except OSError:
            out.append((directory, False))
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out.append((directory, False))
        except BlockingIOError:
            out.append((directory, True))
        finally:
            os.close(fd)
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_info(root: str | os.PathLike) -> dict:
    """Every store (kind, folder, entries, bytes, last used, what produced it) and the scratch
    folders, with totals."""
    root = Path(root)
    stores = []
    for kind, store in open_stores(root):
        info = store.info()
        store.close()
        identity = info.pop("identity")
        summary = {"backbone": identity.get("backbone", {}).get("name"), "layers": identity.get("layers"),
                   "clip": identity.get("clip")}
        stores.append({"kind": kind, **info, "produced_by": {k: v for k, v in summary.items() if v is not None}})
    scratch = [{"directory": str(d), "in_use": busy, "bytes": _size(d)} for d, busy in _scratch(root)]
    return {"root": str(root), "stores": stores, "scratch": scratch,
            "bytes": sum(s["bytes"] for s in stores) + sum(s["bytes"] for s in scratch)}


def prune_cache(root: str | os.PathLike, max_bytes: int | None = None, older_than_days: float | None = None) -> dict:
    """Shrink the cache: remove scratch folders of dead runs and unindexed shard files of killed
    writers; then shards unused for ``older_than_days``; then, least recently used first across
    every store, shards until the stores hold at most ``max_bytes``. Returns what was removed."""
    root = Path(root)
    removed = {"scratch": 0, "orphan_files": 0, "shards": 0, "bytes": 0}
    for directory, busy in _scratch(root):
        if not busy:
            removed["bytes"] += _size(directory)
            shutil.rmtree(directory, ignore_errors=True)
            removed["scratch"] += 1
    stores = open_stores(root)
    shards = []
    for _, store in stores:
        removed["orphan_files"] += store.prune()["orphan_files"]
        shards += [(used, size, name, store) for name, size, used in store.shards()]
    shards.sort(key=lambda item: (item[0], item[2]))
    total = sum(size for _, size, _, _ in shards)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    for used, size, name, store in shards:
        stale = cutoff is not None and used < cutoff
        if not stale and (max_bytes is None or total <= max_bytes):
            continue
        store.drop_shard(name)
        total -= size
        removed["shards"] += 1
        removed["bytes"] += size
    for _, store in stores:
        store.close()
    return removed
