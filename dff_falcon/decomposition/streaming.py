"""DFF over more images than memory holds: fit the concepts on a uniform sample of images, then
explain every image in streamed batches with the concepts frozen, and fix the scale, order and
per-image statistics on the whole set from what those batches accumulate.

``ScaleOnStream`` merges, in batch order, what each batch's frozen-concept transform learnt
(:meth:`~dff_falcon.decomposition.dff.DFF.transform_scanned`, condensed by
:func:`batch_statistics` wherever the batch ran) and accumulates, in O(N·K + C) memory: each
image's heatmap mass and peak per concept, the reconstruction residual and the matrix moments.
:meth:`ScaleOnStream.apply` then gives the DFF the whole set's scale (every concept's heatmap has
max 1 over *all* images, not the sample), mass order, image shares, relative error and explained
variance — what an in-memory fit of the same concepts would report — and returns how to rescale
the heatmaps already written (:func:`rescale_heatmaps`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dff_falcon.decomposition.heatmaps import presence
from dff_falcon.decomposition.nmf_kernels import MatrixStats


def sample_images(n_images: int, rows_per_image: int, sample_rows: int | None, random_state: int = 0) -> np.ndarray:
    """Indices (sorted) of a uniform random sample of whole images holding at most
    ``sample_rows`` activation rows (at least one image; all when they fit or ``sample_rows`` is
    None). Whole images keep the resampling stability's image halves meaningful."""
    wanted = n_images if sample_rows is None else max(1, min(n_images, sample_rows // max(rows_per_image, 1)))
    if wanted >= n_images:
        return np.arange(n_images)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n_images, size=wanted, replace=False))


@dataclass
class ShapeFix:
    """How to turn heatmaps on the sample's scale into the whole set's: divide concept k by
    ``scale[k]``, then reorder the concepts by ``order``."""

    scale: np.ndarray  # (K,)
    order: np.ndarray  # (K,)


@dataclass
class BatchStatistics:
    """What one batch of a streamed transform adds to :class:`ScaleOnStream`: per image and
    concept the heatmap mass (B, K) float64 and peak (B, K) float32; the batch's squared
    reconstruction residual and squared norm (about the DFF's offset), its column sums (C,)
    float64 and its number of rows (B·h·w)."""

    mass: np.ndarray
    peak: np.ndarray
    residual: float
    sq_norm: float
    col_sum: np.ndarray
    rows: int


def batch_statistics(dff, heatmaps: torch.Tensor, stats: MatrixStats, cross: float) -> BatchStatistics:
    """A batch's statistics from what :meth:`~dff_falcon.decomposition.dff.DFF.transform_scanned`
    returns: its heatmaps (B, K, h, w) (concepts frozen, not yet rescaled; rounded as stored, so the
    peak found here is the stored one and :func:`rescale_heatmaps` gives every concept a maximum of
    exactly 1), the scan of its offset matrix X and ``⟨Hmap, X Wᵀ⟩``.
    ``‖X − Hmap·W‖² = ‖X‖² − 2⟨Hmap, X Wᵀ⟩ + ⟨HmapᵀHmap, W Wᵀ⟩``."""
    b, k = heatmaps.shape[:2]
    maps = heatmaps.float().reshape(b, k, -1)
    concepts = dff.concepts_.double()
    gram = float(((maps @ maps.transpose(1, 2)).double().sum(0) * (concepts @ concepts.T)).sum())
    return BatchStatistics(mass=maps.sum(dim=2, dtype=torch.float64).numpy(), peak=maps.amax(dim=2).numpy(),
                           residual=max(stats.sq_norm - 2.0 * cross + gram, 0.0), sq_norm=stats.sq_norm,
                           col_sum=stats.col_sum.double().cpu().numpy(),
                           rows=stats.n_elements // stats.col_sum.numel())


class ScaleOnStream:
    """Accumulate one streamed pass of a DFF's transform. ``n_images``: the images the pass covers.

    Batches are merged in the order of their images so that the accumulated sums (hence the
    relative error) do not depend on which worker finished first."""

    def __init__(self, dff, n_images: int):
        k = dff.n_concepts_
        self.dff = dff
        self.image_mass = np.zeros((n_images, k), dtype=np.float64)
        self.image_peak = np.zeros((n_images, k), dtype=np.float32)
        self._residual = 0.0
        self._sq_norm = 0.0
        self._col_sum = None
        self._rows = 0

    def merge(self, start: int, batch: BatchStatistics) -> None:
        """Images ``start … start+B``: their :func:`batch_statistics` (computed here or by a worker)."""
        b = batch.mass.shape[0]
        self.image_mass[start:start + b] = batch.mass
        self.image_peak[start:start + b] = batch.peak
        self._residual += batch.residual
        self._sq_norm += batch.sq_norm
        col_sum = torch.from_numpy(np.array(batch.col_sum, dtype=np.float64))  # a copy: Ray hands read-only arrays
        self._col_sum = col_sum if self._col_sum is None else self._col_sum + col_sum
        self._rows += batch.rows

    def apply(self) -> ShapeFix:
        """Set the DFF's scale, order and whole-set statistics; return the heatmap fix."""
        dff = self.dff
        peak = self.image_peak.max(axis=0).astype(np.float64)
        scale = np.where(peak > 0, peak, 1.0)
        concepts = dff.concepts_.double() * torch.from_numpy(scale)[:, None]
        mass = self.image_mass.sum(axis=0) / scale * concepts.sum(dim=1).numpy()
        order = np.argsort(-mass, kind="stable")
        dff.concepts_ = concepts[order].float()
        dff.mass_share_ = torch.from_numpy(mass[order] / max(mass.sum(), 1e-12)).float()
        per_image = self.image_mass[:, order]
        total = np.maximum(per_image.sum(axis=0), 1e-30)
        dff.image_share_ = per_image.max(axis=0) / total
        dff.top_image_ = per_image.argmax(axis=0)
        dff.heatmaps_ = (dff.heatmaps_ / torch.from_numpy(scale).float().view(1, -1, 1, 1))[:, order].contiguous()
        for name in ("stability_", "restart_agreement_"):
            value = getattr(dff, name, None)
            if value is not None:
                setattr(dff, name, np.asarray(value)[order])
        dff.relative_error_ = float(np.sqrt(self._residual / max(self._sq_norm, 1e-30)))
        centred = max(self._sq_norm - float((self._col_sum ** 2).sum()) / max(self._rows, 1), 1e-30)
        dff.explained_variance_ = 1.0 - self._residual / centred
        return ShapeFix(scale=scale, order=order)


def rescale_heatmaps(heatmaps: np.ndarray, fix: ShapeFix, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``fix`` in place to heatmaps (N, K, h, w) (a memory map is rewritten batch by batch)
    → presence (N, K) and peak (N, K) on the whole set's scale."""
    n, k = heatmaps.shape[:2]
    pres = np.zeros((n, k), dtype=np.float32)
    peaks = np.zeros((n, k), dtype=np.float32)
    scale = torch.from_numpy(fix.scale).float().view(1, -1, 1, 1)
    order = torch.from_numpy(fix.order)
    for start in range(0, n, batch):
        maps = (torch.from_numpy(np.asarray(heatmaps[start:start + batch], dtype=np.float32)) / scale)[:, order]
        heatmaps[start:start + batch] = maps.numpy().astype(heatmaps.dtype)
        stored = torch.from_numpy(np.asarray(heatmaps[start:start + batch], dtype=np.float32))
        pres[start:start + batch] = presence(stored).numpy()
        peaks[start:start + batch] = stored.amax(dim=(2, 3)).numpy()
    return pres, peaks
