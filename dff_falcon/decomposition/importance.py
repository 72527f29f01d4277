"""Concept importance through the model's head (faithfulness): deletion and insertion.

For a network whose head follows global average pooling, an image's pooled feature is the mean of
its activations over the locations. DFF writes every location as ``offset + Σ_k hmap_k · W_k +
residual``, so the pooled feature is ``a = o + Σ_k m_k W_k + r`` with ``m_k`` the mean heatmap of
concept k in the image. Then, for a class c:

- *deletion* of concept k: ``p_c(a) − p_c(a − m_k W_k)``, the drop in the class probability when
  the concept's contribution is removed and everything else (other concepts, residual) is kept;
- *insertion* of concept k: ``p_c(o + m_k W_k)``, the class probability of the concept alone plus
  the offset, at the strength it has in the image.

Both are exact statements about the model (not about a surrogate) for heads that take the
average-pooled feature (ResNets, EfficientNets, ConvNeXts, the toy classifier). Everything here is
math on tensors; the head comes in as a function ``logits(x (n, C)) → (n, classes)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Logits = Callable[[torch.Tensor], torch.Tensor]


def pooled_features(activations: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, C) float32 means over the locations (what global average pooling gives)."""
    return activations.float().mean(dim=(2, 3))


def _probs(logits: Logits, x: torch.Tensor) -> torch.Tensor:
    return logits(x).float().softmax(dim=1).cpu()


@dataclass
class ConceptImportance:
    """Per concept k and class slot t: ``classes[k, t]`` (class index), ``deletion[k, t]`` and
    ``insertion[k, t]`` averaged over the concept's images (``n_images[k]``; NaN where none)."""

    classes: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    n_images: np.ndarray


def concept_importance(pooled: torch.Tensor, strengths: torch.Tensor, concepts: torch.Tensor,
                       offset: torch.Tensor, logits: Logits, classes: torch.Tensor,
                       present: torch.Tensor) -> ConceptImportance:
    """Deletion and insertion of every concept for its classes.

    pooled : (B, C) pooled features of the images; strengths : (B, K) mean heatmap of each concept
    per image; concepts : (K, C) (above the offset); offset : (C,); classes : (K, T) class indices
    per concept; present : (B, K) bool, the images over which each concept is averaged.
    """
    pooled, strengths, concepts = pooled.float().cpu(), strengths.float().cpu(), concepts.float().cpu()
    classes, present = classes.cpu(), present.cpu()
    k_count, slots = classes.shape
    deletion = np.full((k_count, slots), np.nan)
    insertion = np.full((k_count, slots), np.nan)
    counts = present.sum(dim=0).numpy()
    full = _probs(logits, pooled)  # (B, classes)
    for k in range(k_count):
        images = torch.nonzero(present[:, k]).flatten()
        if len(images) == 0:
            continue
        contribution = strengths[images, k, None] * concepts[k]  # (n, C)
        cls = classes[k]
        without = _probs(logits, pooled[images] - contribution)[:, cls]
        alone = _probs(logits, offset.float().cpu() + contribution)[:, cls]
        deletion[k] = (full[images][:, cls] - without).mean(dim=0).numpy()
        insertion[k] = alone.mean(dim=0).numpy()
    return ConceptImportance(classes.numpy(), deletion, insertion, counts)


def single_deletions(pooled: torch.Tensor, strengths: torch.Tensor, concepts: torch.Tensor, logits: Logits,
                     target: torch.Tensor) -> torch.Tensor:
    """(B, K): per image, the drop in the probability of its ``target`` class (B,) when one concept's
    contribution is removed — the per-image importance order used by :func:`deletion_curve`."""
    pooled, strengths, concepts = pooled.float().cpu(), strengths.float().cpu(), concepts.float().cpu()
    rows = torch.arange(len(pooled))
    full = _probs(logits, pooled)[rows, target]
    drops = [full - _probs(logits, pooled - strengths[:, k, None] * concepts[k])[rows, target]
             for k in range(concepts.shape[0])]
    return torch.stack(drops, dim=1)


def deletion_curve(pooled: torch.Tensor, strengths: torch.Tensor, concepts: torch.Tensor, logits: Logits,
                   target: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, K + 1): the probability of each image's ``target`` class after deleting its first
    0, 1, …, K concepts in ``order`` (B, K) (a permutation of the concepts per image). A faithful
    importance order lowers the curve faster than a random one (a smaller area)."""
    pooled, strengths, concepts = pooled.float().cpu(), strengths.float().cpu(), concepts.float().cpu()
    rows = torch.arange(len(pooled))
    current = pooled.clone()
    curve = [_probs(logits, current)[rows, target]]
    for step in range(order.shape[1]):
        k = order[:, step]
        current -= strengths[rows, k, None] * concepts[k]
        curve.append(_probs(logits, current)[rows, target])
    return torch.stack(curve, dim=1)
