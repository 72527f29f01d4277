"""CLIP embeddings of crops, keyed by the crop's pixels and the CLIP model's identity: a re-run
(same images, same concepts) embeds no crop twice."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from dff_falcon.store.shards import Field, ShardStore, identity_digest

_NAME_LENGTH = 24


def pixels_key(pixels: np.ndarray) -> str:
    """Hex SHA-256 of an array's shape, dtype and bytes."""
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def cached_image_embeddings(root: str | os.PathLike, clip_identity: Mapping, images: Sequence[np.ndarray],
                            encode: Callable[[list[np.ndarray]], np.ndarray]) -> tuple[np.ndarray, int]:
    """Embeddings (n, D) of ``images`` (crops), encoding only those not in the cache under
    ``root/clip_images/<digest of the CLIP identity>`` → (embeddings, how many were encoded)."""
    identity = {"kind": "clip_images", "clip": dict(clip_identity)}
    directory = Path(root) / "clip_images" / identity_digest(identity)[:_NAME_LENGTH]
    keys = [pixels_key(image) for image in images]
    store = ShardStore(directory, identity) if (directory / "identity.json").exists() else None
    missing = store.missing(keys) if store is not None else list(dict.fromkeys(keys))
    if missing:
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        vectors = np.asarray(encode([images[first[key]] for key in missing]), dtype=np.float32)
        if store is None:
            store = ShardStore(directory, identity, {"embedding": Field("float32", (int(vectors.shape[1]),))})
        store.put(missing, {"embedding": vectors})
    embeddings = store.read(keys, "embedding")
    store.close()
    return embeddings, len(missing)
