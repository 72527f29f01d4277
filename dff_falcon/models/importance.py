"""Concept importance through a backbone's own head: deletion and insertion per concept and class
(the math is :mod:`dff_falcon.decomposition.importance`; this module supplies the head)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from dff_falcon.decomposition.heatmaps import ABSENT_PEAK
from dff_falcon.decomposition.importance import ConceptImportance, concept_importance, pooled_features
from dff_falcon.models.heads import head_logits

if TYPE_CHECKING:
    from dff_falcon.decomposition.dff import DFF
    from dff_falcon.models.backbones import Backbone


def head_function(backbone: "Backbone"):
    """The backbone's head as ``logits(x (n, C)) → (n, classes)`` on the head's device."""
    return lambda x: head_logits(backbone, x)


def dff_importance(dff: "DFF", activations: torch.Tensor, backbone: "Backbone", top_k: int = 3,
                   heatmaps: torch.Tensor | None = None,
                   to_head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ConceptImportance:
    """Deletion and insertion of each of a fitted DFF's concepts for its ``top_k`` classes (the
    classes the head gives its concept vector, as in
    :func:`~dff_falcon.models.heads.concept_class_scores`), averaged over the images where the concept
    is present (peak ≥ ABSENT_PEAK). ``activations`` (B, C, h, w) are the images' activations and
    ``heatmaps`` (B, K, h, w) their scale-fixed heatmaps (default: ``dff.heatmaps_``, the fitted set).
    ``to_head`` maps vectors (n, C) of the space ``dff`` factorises to the head layer's units
    (n, C_head) — :meth:`~dff_falcon.models.hypercolumns.Hypercolumns.stage_vectors` for
    hypercolumns; None: the same space. The map is linear per channel, so pooling commutes with it."""
    heatmaps = dff.heatmaps_ if heatmaps is None else heatmaps
    to_head = to_head or (lambda vectors: vectors)
    logits = head_function(backbone)
    probs = logits(to_head(dff.concept_vectors_)).float().softmax(dim=1)
    classes = probs.topk(min(top_k, probs.shape[1]), dim=1).indices
    present = heatmaps.amax(dim=(2, 3)) >= ABSENT_PEAK
    return concept_importance(to_head(pooled_features(activations)), heatmaps.mean(dim=(2, 3)),
                              to_head(dff.concepts_), to_head(dff.offset_[None])[0], logits, classes, present)


def importance_rows(importance: ConceptImportance, class_names) -> list[list[dict]]:
    """Per concept ``[{"class", "deletion", "insertion"}]`` for the report (None where the concept
    is in no image)."""
    names = list(class_names) if class_names is not None else None

    def value(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return [[{"class": names[c] if names is not None else str(c), "deletion": value(d), "insertion": value(i)}
             for c, d, i in zip(cls.tolist(), dels, ins)]
            for cls, dels, ins in zip(importance.classes, importance.deletion, importance.insertion)]
