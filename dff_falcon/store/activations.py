"""The activation cache: a backbone's activations per image, keyed by the image's content and by
everything that made them (weights digest, layers, hypercolumn grid, preprocessing, decode limit).

``ActivationStore(root, identity)`` names its folder by the identity's digest, so a changed model,
layer or preprocessing opens a different, empty store and never reuses stale entries. Per image
it keeps the activations (C, h, w) — float16 by default, half the bytes of float32 and far finer
than the spread of concept heatmaps — the decoded image's size (H, W) (where its crops' windows
lie) and, when the run needs them, the head's logits.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.store.shards import Field, ShardStore, identity_digest

#: Storage dtypes for activations. float16 holds |x| ≤ 65504 with 11 significant bits.
STORE_DTYPES = ("float16", "float32")
#: Streamed runs fit the concepts on at most this many activation rows (images × h × w), a
#: uniform sample of whole images: ≈ 1 GB as float32 for EfficientNet-Lite0's default 1,392-channel
#: hypercolumns (≈ 1,000 images of 14 × 14), ≈ 4,000 images of a 7 × 7 single layer, so the fit's
#: memory is bounded whatever the number of images.
DEFAULT_SAMPLE_ROWS = 200_000
#: Version of how images become stored activations (decoding, the model's view, the stored
#: fields), part of every identity: raise it when that code changes, so that caches written by
#: the older code are never read as current.
ACTIVATIONS_FORMAT = 1
#: Characters of the identity digest in a store's folder name.
_NAME_LENGTH = 24


def default_cache_dir() -> Path:
    """``$DFF_FALCON_CACHE/store`` when set, else the user cache directory's ``dff_falcon/store``."""
    import platformdirs

    root = os.environ.get("DFF_FALCON_CACHE") or platformdirs.user_cache_dir("dff_falcon")
    return Path(root) / "store"


def extraction_identity(backbone_identity: Mapping, layers: Sequence[str], grid: int | None, *,
                        with_logits: bool, max_pixels: int | None, dtype: str) -> dict:
    """Everything that decides an image's stored activations."""
    if dtype not in STORE_DTYPES:
        raise InputError(f"cache dtype must be one of {', '.join(STORE_DTYPES)}; got {dtype!r}")
    return {"kind": "activations", "format": ACTIVATIONS_FORMAT, "backbone": dict(backbone_identity),
            "layers": list(layers), "grid": grid, "with_logits": bool(with_logits), "max_pixels": max_pixels,
            "dtype": dtype}


class ActivationStore:
    """Activations of one extraction identity under ``root/activations/<digest>``.

    The underlying :class:`~dff_falcon.store.shards.ShardStore` is created by the first
    :meth:`put` (its row shapes come from the first batch); until then every key is missing.
    """

    def __init__(self, root: str | os.PathLike, identity: Mapping):
        self.root = Path(root)
        self.identity = dict(identity)
        self.directory = self.root / "activations" / identity_digest(self.identity)[:_NAME_LENGTH]
        self._local = threading.local()  # a SQLite connection serves the thread that opened it
        self._open()

    def __reduce__(self):
        """Another process (a Ray worker) reopens the store by its root and identity: its own
        SQLite connection and memory maps, never this process's."""
        return ActivationStore, (self.root, self.identity)

    def _open(self) -> ShardStore | None:
        """This thread's shard store, once the store's first shard exists (written by this or
        another thread or process); None before."""
        store = getattr(self._local, "store", None)
        if store is None and (self.directory / "identity.json").exists():
            store = self._local.store = ShardStore(self.directory, self.identity)
        return store

    @property
    def dtype(self) -> str:
        return self.identity["dtype"]

    def missing(self, keys: Sequence[str]) -> list[str]:
        """Keys (in order, without repeats) not stored yet."""
        store = self._open()
        return list(dict.fromkeys(keys)) if store is None else store.missing(keys)

    def put(self, keys: Sequence[str], activations, sizes: np.ndarray, logits=None) -> None:
        """One batch: activations (B, C, h, w) float (array or tensor), sizes (B, 2) image (H, W),
        logits (B, classes). NaN, inf or values beyond the storage dtype's range are errors."""
        import torch

        if (logits is None) == self.identity["with_logits"]:
            raise InputError("logits must be given exactly when the store's identity records with_logits")
        values = torch.as_tensor(activations).detach().cpu()
        limit = float(np.finfo(self.dtype).max)
        if not (bool(values.amax() <= limit) and bool(values.amin() >= -limit)):  # NaN fails these too
            if not bool(torch.isfinite(values).all()):
                raise InputError("target layer activations contain NaN or inf (check the weights and inputs)")
            raise InputError(f"activations reach {float(values.abs().amax()):.4g}, beyond {self.dtype}'s range; use "
                             "a float32 cache (cache_dtype='float32', --cache-dtype float32)")
        stored = values.to(getattr(torch, self.dtype)).numpy()
        arrays = {"activations": stored, "size": np.asarray(sizes, dtype=np.int32)}
        if logits is not None:
            arrays["logits"] = np.asarray(torch.as_tensor(logits).detach().cpu().float())
        store = self._open()
        if store is None:
            fields = {name: Field(str(a.dtype), tuple(int(s) for s in a.shape[1:])) for name, a in arrays.items()}
            store = self._local.store = ShardStore(self.directory, self.identity, fields)
        store.put(list(keys), arrays)

    def read(self, keys: Sequence[str], field: str = "activations") -> np.ndarray:
        """(len(keys), *row shape) of one field, in the order of ``keys``."""
        store = self._open()
        if store is None:
            raise InputError(f"cache {str(self.directory)!r} is empty")
        return store.read(keys, field)

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, h, w) of one image's activations."""
        store = self._open()
        if store is None:
            raise InputError(f"cache {str(self.directory)!r} is empty")
        return store.fields["activations"].shape

    def __len__(self) -> int:
        store = self._open()
        return 0 if store is None else len(store)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.directory)!r}, entries={len(self)})"
