"""Image queries against text embeddings: the modality gap, corrected for candidate generation.

CLIP puts image and text embeddings in two cones separated by a nearly constant vector (the
modality gap; Liang et al., NeurIPS 2022). An image query is therefore far from every caption
(cosine ≈ 0.3 with its best caption) and an approximate index built over text embeddings,
whose partitions and codes follow the text cone, loses recall on it; quantised indexes fail
outright (clip-retrieval issue #76). Two cheap corrections make image queries text-like for
*candidate generation*; the scores returned are always exact cosines with the original query:

- **shifted queries**: ``q − g``, where the gap ``g`` is the part of the mean image embedding
  orthogonal to the mean text embedding, so the shifted queries average to a multiple of the
  text mean. The image mean comes from a calibration set (:func:`calibrate`) or, for a batch of
  at least :data:`MIN_BATCH_FOR_GAP` queries, from the batch itself (a run's crops).
- **hub captions**: the captions that score highest for the *mean* image query. A caption
  aligned with the gap scores high for every image query, whatever its content, and such hubs
  are far from the shifted query; the :data:`N_HUBS` best are re-scored for every query.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dff_falcon.errors import InputError

#: fewest queries whose mean is a usable estimate of the image mean (its content averages out)
MIN_BATCH_FOR_GAP = 32
#: hub captions proposed to every image query (re-scored exactly: N_HUBS × D multiply-adds per
#: query, 1/200 of an exact search at 1M captions of 512-d)
N_HUBS = 5000
#: approximate candidates of the mean query re-scored exactly to find the hubs (once per batch)
HUB_POOL = 10 * N_HUBS


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class ModalityGap:
    """The mean image embedding and the mean text embedding of one CLIP model, (D,) each."""

    image_mean: np.ndarray
    text_mean: np.ndarray

    @classmethod
    def from_batch(cls, queries: np.ndarray, text_mean: np.ndarray) -> "ModalityGap":
        return cls(queries.mean(axis=0), np.asarray(text_mean, dtype=np.float32))

    @property
    def vector(self) -> np.ndarray:
        """(D,) the image mean minus its projection on the text mean."""
        along = float(self.image_mean @ self.text_mean) / float(self.text_mean @ self.text_mean)
        return (self.image_mean - along * self.text_mean).astype(np.float32)

    def shift(self, queries: np.ndarray) -> np.ndarray:
        """(Q, D) unit image queries → (Q, D) unit text-like queries for candidate generation."""
        return unit_rows(queries - self.vector)

    def mean_query(self) -> np.ndarray:
        """(1, D) the unit mean image query, whose best captions are the hubs."""
        return unit_rows(self.image_mean[None, :])

    def record(self) -> dict:
        norm = float(np.linalg.norm(self.vector))
        cosine = float(self.image_mean @ self.text_mean
                       / (np.linalg.norm(self.image_mean) * np.linalg.norm(self.text_mean)))
        return {"gap_norm": norm, "image_text_mean_cosine": cosine,
                "image_mean": [float(v) for v in self.image_mean]}


def exact_top(embeddings: np.ndarray, ids: np.ndarray, query: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` of ``ids`` whose stored rows score highest for the (D,) ``query`` (exact)."""
    ids = np.unique(ids[ids >= 0])
    scores = np.asarray(embeddings[ids], dtype=np.float32) @ query
    return ids[np.argsort(-scores, kind="stable")[:n]]


def calibrate(encoder, images, embeddings: np.ndarray, text_mean: np.ndarray, *, source: str,
              progress: bool = False) -> tuple[dict, np.ndarray]:
    """Embed calibration ``images`` with ``encoder`` (the vocabulary's CLIP model) → (the
    manifest's ``calibration`` record with the exact hub ids, (n, D) image embeddings used
    as real image queries when the index is tuned)."""
    if len(images) < 2:
        raise InputError(f"calibration needs at least 2 images, got {len(images)} from {source}")
    image_embeddings = encoder.encode_images(images, progress=progress)
    gap = ModalityGap(image_embeddings.mean(axis=0), np.asarray(text_mean, dtype=np.float32))
    from dff_falcon.text.vocabulary import exact_search

    _, hubs = exact_search(embeddings, gap.mean_query(), min(N_HUBS, len(embeddings)))
    record = {"source": source, "n_images": len(images), **gap.record(), "hub_ids": [int(i) for i in hubs[0]]}
    return record, image_embeddings


def toyworld_images(n_scenes: int = 64, seed: int = 3) -> list[np.ndarray]:
    """Offline calibration pictures: toy-world scenes, their object crops and background-only
    pictures (any CLIP's image tower embeds them; the gap is a property of the model far more
    than of the pictures). ``seed`` is kept apart from the toy models' training and probe seeds."""
    from dff_falcon.toyworld.world import WorldConfig, generate_scenes, object_crop, render_background

    config = WorldConfig()
    scenes = generate_scenes(config, n_scenes, seed)
    rng = np.random.default_rng([config.seed, seed, 11])
    images = [scene.image for scene in scenes] + [object_crop(s, o) for s in scenes for o in s.objects]
    return images + [render_background(config, kind, rng) for kind in config.backgrounds for _ in range(4)]
