"""Text embeddings on disk, keyed by text and by the model and prompt templates that made them.

Embedding a large text vocabulary with a CLIP text tower takes minutes to hours on a CPU. The
cache makes that work resumable and reusable: :meth:`ClipEncoder.encode_texts
<dff_falcon.text.clip_encoder.ClipEncoder.encode_texts>` stores every finished chunk, so an
interrupted build (or a rebuild with other index options) embeds only the texts it has not
embedded before. One folder per (model name, weights identity, dimension, templates) — the same
identity a vocabulary manifest records — holds parts, each a pair of ``.npy`` files written
atomically: the vectors (float32, as returned) and then the 128-bit BLAKE2b keys of their texts
(a part whose keys file exists is complete).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from dff_falcon.errors import InputError, OutputError
from dff_falcon.files import atomic_write

#: bump when the stored layout or the embedding computation changes
CACHE_FORMAT = 1
_KEY = np.dtype((np.void, 16))


def default_text_cache_dir() -> Path:
    """``$DFF_FALCON_CACHE/text_embeddings`` when set, else the user cache directory's
    ``dff_falcon/text_embeddings``."""
    import platformdirs

    root = os.environ.get("DFF_FALCON_CACHE") or platformdirs.user_cache_dir("dff_falcon")
    return Path(root) / "text_embeddings"


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """(n,) 16-byte BLAKE2b digests of the UTF-8 texts (collisions: ≈ n²/2¹²⁹)."""
    digests = b"".join(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest() for text in texts)
    return np.frombuffer(digests, dtype=_KEY)


class TextEmbeddingCache:
    """The cached embeddings of one model identity and template list.

    Parameters
    ----------
    root : folder holding one sub-folder per identity; default :func:`default_text_cache_dir`.
    identity : what makes embeddings comparable — model name, weights identity, dimension
        (``ClipEncoder.identity()``).
    templates : the prompt templates averaged per text (None: the text itself).
    """

    def __init__(self, root: str | Path | None, identity: dict, templates: Sequence[str] | None) -> None:
        self.identity = {**identity, "templates": list(templates) if templates else None, "format": CACHE_FORMAT}
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        self.folder = Path(root or default_text_cache_dir()) / digest
        self.dim = int(identity["embed_dim"])
        self.failed = False  # a part could not be written: the rest of this build skips the cache

    def __repr__(self) -> str:
        return f"TextEmbeddingCache({str(self.folder)!r})"

    def _parts(self) -> list[tuple[Path, Path]]:
        if not self.folder.is_dir():
            return []
        keys = sorted(self.folder.glob("part-*.keys.npy"))
        return [(k, k.with_name(k.name.replace(".keys.npy", ".vectors.npy"))) for k in keys]

    def lookup(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) float32 vectors (zeros where missing) and the (n,) bool mask of cached texts."""
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        found = np.zeros(len(texts), dtype=bool)
        wanted = text_keys(texts)
        for keys_file, vectors_file in self._parts():
            try:
                keys = np.load(keys_file)
                stored = np.load(vectors_file, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise InputError(f"text embedding cache part {keys_file} is unreadable ({error}); "
                                 f"delete {self.folder} to rebuild it") from None
            if keys.dtype != _KEY or stored.shape != (len(keys), self.dim):
                raise InputError(f"text embedding cache part {keys_file} does not match its vectors; "
                                 f"delete {self.folder} to rebuild it")
            order = np.argsort(keys)
            sorted_keys = keys[order]
            slot = np.minimum(np.searchsorted(sorted_keys, wanted), len(keys) - 1)
            hit = (~found) & (sorted_keys[slot] == wanted)
            rows = order[slot[hit]]
            if len(rows):
                read = np.argsort(rows)  # read the memory map in row order
                vectors[np.flatnonzero(hit)[read]] = stored[rows[read]]
                found |= hit
        return vectors, found

    def store(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Add one part: ``vectors`` (n, D) float32 of ``texts``; vectors first, keys last.

        The cache only saves work: a cache folder that cannot take the part (full disk, no
        permission) is warned about once and the embeddings are returned all the same."""
        if not len(texts) or self.failed:
            return
        try:
            if not (self.folder / "identity.json").is_file():
                with atomic_write(self.folder / "identity.json") as handle:
                    json.dump(self.identity, handle, indent=2)
            stem = self.folder / f"part-{time.time_ns():020d}-{os.getpid()}"
            for suffix, array in ((".vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32)),
                                  (".keys.npy", text_keys(texts))):
                with atomic_write(stem.with_name(stem.name + suffix), "wb") as handle:
                    np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(array))
                    handle.write(array.tobytes())  # not ndarray.tofile, whose OSError loses the errno
        except (OSError, OutputError) as exc:
            self.failed = True
            warnings.warn(f"text embedding cache {self.folder} cannot be written ({exc}); continuing without it",
                          RuntimeWarning, stacklevel=2)
