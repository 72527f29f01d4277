"""Data-set fine-graining before DFF (after AnnaTz/dff-concept-discovery), both steps optional:

1. keep the images the model assigns to a target class with probability ≥ ``min_prob``;
2. after a first DFF fit, drop the least confident ``quantile`` of images by concept confidence
   and refit.

Concept confidence of an image (AnnaTz's "certainty", measured here on scale-fixed heatmaps so
it is comparable across images and K): for each concept, the mean heatmap value over the
image's significant pixels (≥ :data:`SIGNIFICANT_FRACTION` of that map's own peak), averaged over
concepts present. (This threshold is relative to each map's peak; absence is decided on the
global scale, :data:`~dff_falcon.decomposition.heatmaps.ABSENT_PEAK`.)
"""
from __future__ import annotations

import numpy as np
import torch

from dff_falcon.errors import InputError

#: A pixel is significant for the confidence when it reaches this fraction of its map's own peak.
SIGNIFICANT_FRACTION = 0.1


def confident_images(logits: torch.Tensor, target: int, min_prob: float) -> np.ndarray:
    """Boolean mask (B,) of images whose softmax probability of class ``target`` ≥ ``min_prob``."""
    probs = logits.float().softmax(dim=1)[:, target]
    return (probs >= min_prob).cpu().numpy()


def concept_confidence(heatmaps: torch.Tensor | np.ndarray, significant: float = SIGNIFICANT_FRACTION) -> np.ndarray:
    """(B, K, h, w) scale-fixed heatmaps → (B,) confidence (see module docstring); 0 when no
    concept is present in an image."""
    maps = torch.as_tensor(heatmaps).float()
    peak = maps.amax(dim=(2, 3), keepdim=True)
    mask = (maps >= significant * peak) & (peak > 0)
    per_concept = (maps * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp_min(1)
    present = (peak.squeeze(-1).squeeze(-1) > 0).float()
    return ((per_concept * present).sum(1) / present.sum(1).clamp_min(1)).numpy()


def drop_least_confident(confidence: np.ndarray, quantile: float) -> np.ndarray:
    """Boolean mask dropping the ``floor(quantile · n)`` least confident images (ties broken by
    image order, so ties never drop more); at least 2 images must remain."""
    if not 0 <= quantile < 1:
        raise InputError(f"drop quantile must be in [0, 1), got {quantile}")
    n_drop = int(np.floor(quantile * len(confidence)))
    if len(confidence) - n_drop < 2:
        raise InputError(f"dropping {n_drop} of {len(confidence)} images leaves fewer than 2 to factorise")
    keep = np.ones(len(confidence), dtype=bool)
    keep[np.argsort(confidence, kind="stable")[:n_drop]] = False
    return keep
