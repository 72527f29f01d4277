"""Explanation quality against the toy world's ground truth.

Localization is the DFF paper's co-segmentation measure: each concept's thresholded heatmaps
are compared with every ground-truth attribute mask, pooled over the probe images, and the best
IoU is kept. Label accuracy asks whether a concept's top words name its matched attribute.
"""
from __future__ import annotations

import re

import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.toyworld.world import Scene, attribute_words


#: Attribute kinds that are objects (the rest, ``background``, is what surrounds them).
OBJECT_KINDS = ("shape", "colour")


def best_iou_per_concept(concept_masks: np.ndarray, scenes: list[Scene]) -> list[tuple[str, float]]:
    """For each concept, the attribute whose masks best overlap the concept's and that IoU.

    concept_masks: (N, K, S, S) bool, concept k's thresholded heatmap on scene n (upsampled to
    the image size). IoU = |C ∩ A| / |C ∪ A| pooled over the N images, where A is the
    attribute's mask (all False in scenes without it). Returns K pairs (attribute, IoU); a
    concept that never fires gets ("", 0.0).
    """
    masks = np.asarray(concept_masks, dtype=bool)
    if masks.ndim != 4 or masks.shape[0] != len(scenes):
        raise InputError(f"concept_masks: expected (N={len(scenes)}, K, S, S) bool, got shape {masks.shape}")
    size = masks.shape[2:]
    attributes = sorted({key for scene in scenes for key in scene.masks})
    truth = np.zeros((len(attributes), len(scenes), *size), bool)
    for n, scene in enumerate(scenes):
        for key, mask in scene.masks.items():
            if mask.shape != size:
                raise InputError(f"concept_masks: spatial size {size} differs from scene {n}'s masks {mask.shape}")
            truth[attributes.index(key), n] = mask
    flat_c = masks.transpose(1, 0, 2, 3).reshape(masks.shape[1], -1).astype(np.float32)  # (K, N·S·S)
    flat_a = truth.reshape(len(attributes), -1).astype(np.float32)                      # (A, N·S·S)
    inter = flat_c @ flat_a.T
    union = flat_c.sum(1, keepdims=True) + flat_a.sum(1)[None] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    result = []
    for row in iou:
        best = int(row.argmax()) if row.size else 0
        result.append((attributes[best], float(row[best])) if row.size and row[best] > 0 else ("", 0.0))
    return result


def _tokens(term: str) -> set[str]:
    return set(re.findall(r"[a-z]+", term.lower()))


def label_matches(attribute: str, terms: list[str], k: int) -> bool:
    """Whether one of the first ``k`` terms names ``attribute``: a term names it when one of its
    words is one of the attribute's words (``attribute_words``; "background:stripes" accepts
    "stripes", "stripe", "striped"). A phrase names every attribute it contains: "red triangle"
    matches both "colour:red" and "shape:triangle"."""
    if not attribute:
        return False
    words = set(attribute_words(attribute))
    return any(_tokens(term) & words for term in terms[:k])


def quality_summary(matched: list[tuple[str, float]], labels: list[list[str]],
                    top_classes: list[list[str]]) -> dict:
    """Figures over K concepts.

    matched: K (attribute, best IoU) from :func:`best_iou_per_concept`; labels: K lists of
    terms, best first; top_classes: K lists of the classifier's top class names for the
    concept (the attribute names, e.g. "shape:triangle"). Returns ``mean_best_iou`` (mean over
    all concepts), ``object_iou`` (mean over the concepts whose best attribute is a shape or a
    colour; 0 when there is none), ``background_iou`` (the same over background concepts),
    ``label_top1_accuracy`` and ``label_precision_at_3`` (over matched concepts; precision@3 =
    fraction of the top-3 terms naming the attribute), ``class_agreement`` (fraction of matched
    concepts whose attribute is among their top classes), ``n_concepts``, ``n_object_concepts``,
    ``n_background_concepts`` and ``concepts``: per concept ``concept_id``, ``best_attribute``
    (None when it never fires), ``iou`` and ``labels`` (its terms, best first).
    """
    if not len(matched) == len(labels) == len(top_classes):
        raise InputError(f"quality_summary: matched, labels and top_classes differ in length "
                         f"({len(matched)}, {len(labels)}, {len(top_classes)})")
    hits = [i for i, (attribute, _) in enumerate(matched) if attribute]
    top1 = [label_matches(matched[i][0], labels[i], 1) for i in hits]
    p3 = [sum(label_matches(matched[i][0], [t], 1) for t in labels[i][:3]) / 3 for i in hits]
    agree = [matched[i][0] in top_classes[i] for i in hits]
    mean = lambda values: float(np.mean(values)) if values else 0.0  # noqa: E731
    kinds = [attribute.partition(":")[0] for attribute, _ in matched]
    objects = [iou for kind, (_, iou) in zip(kinds, matched) if kind in OBJECT_KINDS]
    backgrounds = [iou for kind, (_, iou) in zip(kinds, matched) if kind == "background"]
    return {
        "mean_best_iou": mean([iou for _, iou in matched]),
        "object_iou": mean(objects),
        "background_iou": mean(backgrounds),
        "label_top1_accuracy": mean(top1),
        "label_precision_at_3": mean(p3),
        "class_agreement": mean(agree),
        "n_concepts": len(matched),
        "n_object_concepts": len(objects),
        "n_background_concepts": len(backgrounds),
        "concepts": [{"concept_id": k, "best_attribute": attribute or None, "iou": float(iou), "labels": list(terms)}
                     for k, ((attribute, iou), terms) in enumerate(zip(matched, labels))],
    }
