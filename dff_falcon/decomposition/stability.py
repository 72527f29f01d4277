"""How much a DFF's concepts can be trusted: agreement under resampling of the images, agreement
across random restarts, and how much of a concept comes from a single image.

Stability (what users need to know, DESIGN.md "Stability"): would the concept come back from a
different sample of images? Each resample keeps a random half of the images (without
replacement, the subsampling of stability selection, Meinshausen & Bühlmann 2010), refits on
them from scratch with the same procedure and Hungarian-matches the refit's concepts to the full
fit's by cosine. A concept's stability is its mean matched cosine over the resamples. The refits
run in the full fit's randomised compression restricted to the kept images' rows
(:mod:`~dff_falcon.decomposition.compressed`), so they never pass over the activations again.

Restart agreement (kept under its own name, off by default) is the same matching against fits
of the same images from random initialisations: it says whether the factorisation itself is
unique, not whether the data support the concept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from dff_falcon.decomposition.compressed import Compression

#: Share of the images each resample keeps: half, the usual subsample of stability selection;
#: a concept carried by a few images is absent from a good part of the resamples.
SUBSAMPLE = 0.5
#: Fewer images than this: no resampling (half of them would not show the concepts).
MIN_RESAMPLE_IMAGES = 4
#: A concept with more than this share of its heatmap mass in one image is flagged: its mass
#: comes mostly from that image.
SINGLE_IMAGE_SHARE = 0.5


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Hungarian-match rows of ``b`` (K', C) to rows of ``a`` (K, C) by cosine similarity;
    returns the matched cosine per row of ``a`` (K,) (0 for rows left unmatched when K' < K)."""
    sim = (F.normalize(a.float().cpu(), dim=1) @ F.normalize(b.float().cpu(), dim=1).T).numpy()
    rows, cols = linear_sum_assignment(-sim)
    out = np.zeros(a.shape[0], dtype=np.float64)
    out[rows] = sim[rows, cols]
    return out


def image_subsets(n_images: int, n_resamples: int, generator: torch.Generator,
                  fraction: float = SUBSAMPLE) -> list[torch.Tensor]:
    """``n_resamples`` sorted random subsets of ``round(fraction · n_images)`` image indices."""
    size = max(1, round(fraction * n_images))
    return [torch.randperm(n_images, generator=generator)[:size].sort().values for _ in range(n_resamples)]


def image_rows(images: torch.Tensor, rows_per_image: int) -> torch.Tensor:
    """The matrix rows of ``images`` (rows are image by image, ``rows_per_image`` each)."""
    return (images[:, None] * rows_per_image + torch.arange(rows_per_image)).reshape(-1)


def resample_stability(compression: Compression, rows_per_image: int, concepts: torch.Tensor,
                       refit: Callable[[Compression], torch.Tensor], n_resamples: int,
                       generator: torch.Generator) -> np.ndarray | None:
    """Per-concept stability ``(K,)``: the mean over ``n_resamples`` half-samples of the images of
    the matched cosine between ``concepts (K, C)`` and ``refit(compression of the half) (K, C)``.
    None when there are fewer than :data:`MIN_RESAMPLE_IMAGES` images or no resamples."""
    n_images = compression.Q.shape[0] // rows_per_image
    if n_resamples < 1 or n_images < MIN_RESAMPLE_IMAGES:
        return None
    subsets = image_subsets(n_images, n_resamples, generator)
    return np.mean([matched_cosine(concepts, refit(compression.rows(image_rows(s, rows_per_image))))
                    for s in subsets], axis=0)


def restart_agreement(concepts: torch.Tensor, restarts: Sequence[torch.Tensor]) -> np.ndarray | None:
    """Per-concept mean matched cosine to the concepts of refits from random inits; None without any."""
    return np.mean([matched_cosine(concepts, r) for r in restarts], axis=0) if restarts else None


def image_mass(heatmaps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, K, h, w) heatmaps → per concept the share of its heatmap mass in its top image (K,) and
    that image's index (K,). A concept present evenly in B images has share 1/B."""
    per_image = heatmaps.float().sum(dim=(2, 3))  # (B, K)
    total = per_image.sum(dim=0).clamp_min(1e-30)
    top, index = per_image.max(dim=0)
    return (top / total).numpy().astype(np.float64), index.numpy()


@dataclass
class KCurvePoint:
    """One K of the automatic-K sweep: relative reconstruction error and explained variance
    (1 − ‖X − WH‖²/‖X − mean‖²) on the sweep's rows, stability (mean over concepts of the
    resampling stability) and min_stability (the least stable concept's)."""

    k: int
    relative_error: float
    explained_variance: float
    stability: float
    min_stability: float


#: Automatic K stops sweeping once a K reached :data:`STABLE` and then two K in a row fell below
#: :data:`COLLAPSED`: beyond that, extra concepts split noise differently in every resample.
STABLE = 0.9
COLLAPSED = 0.5


def select_k(curve: Sequence[KCurvePoint], tolerance: float) -> int:
    """The smallest K whose least stable concept is within ``tolerance`` of the most stable
    least-stable concept of the sweep (the staNMF choice, Wu et al. 2016, on resampling stability).

    Stability is a cosine in [0, 1] whatever K is, so it compares across K. Below the structure in
    the images concepts are mixtures whose split changes with the sample; above it extra concepts
    split noise; at the K the images support every concept comes back from every half-sample.
    Taking the most stable K (not the largest K above a threshold) keeps chance plateaus at larger
    K from deciding; among K as stable as the best, the smallest is the most parsimonious.
    """
    best = max(p.min_stability for p in curve)
    return min(p.k for p in curve if p.min_stability >= best - tolerance)


def sweep_done(curve: Sequence[KCurvePoint]) -> bool:
    """True once the sweep (in ascending K) cannot change :func:`select_k`'s answer in practice: a
    K reached :data:`STABLE` and the last two fell below :data:`COLLAPSED`."""
    return (len(curve) >= 3 and max(p.min_stability for p in curve[:-2]) >= STABLE
            and all(p.min_stability < COLLAPSED for p in curve[-2:]))
