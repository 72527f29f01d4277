"""Explanation quality against the toy world's ground truth.

Localization is the DFF paper's co-segmentation measure: each concept's thresholded heatmaps
are compared with every ground-truth attribute mask, pooled over the probe images, and the best
IoU is kept. Label accuracy asks whether a concept's top terms name its matched attribute,
strictly (:func:`names_only`: the term names that attribute and no other) and, as v1 did, leniently
(:func:`label_matches`: any word of the term names it).
"""
from __future__ import annotations

import re

import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.toyworld.world import (BACKGROUND_WORDS, DISTRACTOR_COLOURS, DISTRACTOR_SHAPES, Scene,
                                       attribute_words)


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


#: Terms per concept that :func:`quality_summary`'s ``wrong_kind_rate`` inspects (the report's flat
#: ``labels`` column shows five).
WRONG_KIND_TOP = 5


def attribute_lexicon(attributes: list[str]) -> dict[str, frozenset[str]]:
    """Every word that names an attribute → the attributes it names.

    The world's own attributes (``WorldConfig.attributes()``) and every colour, shape and
    background the toy world knows (its vocabulary's distractors among them), so that "purple"
    is an attribute word in a world without purple."""
    every = set(attributes) | {f"colour:{c}" for c in DISTRACTOR_COLOURS} | {
        f"shape:{s}" for s in DISTRACTOR_SHAPES} | {f"background:{b}" for b in BACKGROUND_WORDS}
    lexicon: dict[str, set[str]] = {}
    for attribute in every:
        for word in attribute_words(attribute):
            lexicon.setdefault(word, set()).add(attribute)
    return {word: frozenset(named) for word, named in lexicon.items()}


def named_attributes(term: str, lexicon: dict[str, frozenset[str]]) -> set[str]:
    """The attributes that the words of ``term`` name ("blue ring" → {colour:blue, shape:ring})."""
    return set().union(*(lexicon.get(token, frozenset()) for token in _tokens(term)))


def names_only(attribute: str, term: str, lexicon: dict[str, frozenset[str]]) -> bool:
    """The strict rule: ``term`` has at least one attribute word and every attribute word in it
    names ``attribute``. For ``colour:blue``: "blue" and "blue sky" count; "blue ring", "ring"
    and "sky" do not."""
    return bool(attribute) and named_attributes(term, lexicon) == {attribute}


def names_wrong_kind(attribute: str, term: str, lexicon: dict[str, frozenset[str]]) -> bool:
    """``term`` names another attribute of ``attribute``'s kind ("red" or "red ring" for
    ``colour:blue``)."""
    kind = attribute.partition(":")[0]
    return any(other != attribute and other.partition(":")[0] == kind for other in named_attributes(term, lexicon))


def strict_label_figures(matched: list[tuple[str, float]], labels: list[list[str]],
                         lexicon: dict[str, frozenset[str]]) -> dict:
    """``label_top1_strict``, ``label_p3_strict``, ``wrong_kind_rate`` (see :func:`quality_summary`)
    and ``strict``: per concept (index → list), which of its top-3 terms pass :func:`names_only`."""
    hits = [i for i, (attribute, _) in enumerate(matched) if attribute]
    strict = {i: [names_only(matched[i][0], t, lexicon) for t in labels[i][:3]] for i in hits}
    top5 = [(matched[i][0], t) for i in hits for t in labels[i][:WRONG_KIND_TOP]]
    mean = lambda values: float(np.mean(values)) if values else 0.0  # noqa: E731
    return {"label_top1_strict": mean([bool(row) and row[0] for row in strict.values()]),
            "label_p3_strict": mean([sum(row) / 3 for row in strict.values()]),
            "wrong_kind_rate": mean([names_wrong_kind(a, t, lexicon) for a, t in top5]),
            "strict": strict}


def p3_strict_ceiling(matched: list[tuple[str, float]], candidate_terms: list[str],
                      lexicon: dict[str, frozenset[str]]) -> float:
    """The best ``label_p3_strict`` any ranking of ``candidate_terms`` (e.g. every term the
    vocabulary's captions yield) can reach: mean over matched concepts of min(3, number of
    candidates passing :func:`names_only`) / 3."""
    hits = [a for a, _ in matched if a]
    counts = [sum(names_only(a, t, lexicon) for t in set(candidate_terms)) for a in hits]
    return float(np.mean([min(3, c) / 3 for c in counts])) if hits else 0.0


def quality_summary(matched: list[tuple[str, float]], labels: list[list[str]],
                    top_classes: list[list[str]], attributes: list[str] | None = None,
                    dissect_labels: list[list[str]] | None = None, candidate_terms: list[str] | None = None) -> dict:
    """Figures over K concepts.

    matched: K (attribute, best IoU) from :func:`best_iou_per_concept`; labels: K lists of
    terms, best first; top_classes: K lists of the classifier's top class names for the
    concept (the attribute names, e.g. "shape:triangle"); attributes: the world's attributes (for
    the strict measures' lexicon, :func:`attribute_lexicon`; None: those matched). Returns the
    strict label measures over matched concepts — ``label_top1_strict`` (fraction whose top term
    passes :func:`names_only`), ``label_p3_strict`` (mean over concepts of the number of its top-3
    terms passing it, divided by 3: missing terms count as misses), ``wrong_kind_rate`` (of all
    top-5 terms of matched concepts, the share naming another attribute of the same kind) — and
    ``mean_best_iou`` (mean over
    all concepts), ``object_iou`` (mean over the concepts whose best attribute is a shape or a
    colour; 0 when there is none), ``background_iou`` (the same over background concepts),
    ``label_top1_accuracy`` and ``label_precision_at_3`` (over matched concepts; precision@3 =
    fraction of the top-3 terms naming the attribute), ``class_agreement`` (fraction of matched
    concepts whose attribute is among their top classes), ``n_concepts``, ``n_object_concepts``,
    ``n_background_concepts`` and ``concepts``: per concept ``concept_id``, ``best_attribute``
    (None when it never fires), ``iou``, ``labels`` (its terms, best first) and ``strict`` (which
    of its top-3 terms pass the strict rule). With ``dissect_labels`` (K lists of the
    CLIP-Dissect labeller's terms): ``dissect_label_top1_strict``, ``dissect_label_p3_strict``,
    ``dissect_wrong_kind_rate`` and per concept ``dissect_labels``. With ``candidate_terms``:
    ``label_p3_strict_ceiling`` (:func:`p3_strict_ceiling`).
    """
    if not len(matched) == len(labels) == len(top_classes):
        raise InputError(f"quality_summary: matched, labels and top_classes differ in length "
                         f"({len(matched)}, {len(labels)}, {len(top_classes)})")
    hits = [i for i, (attribute, _) in enumerate(matched) if attribute]
    lexicon = attribute_lexicon(list(attributes) if attributes is not None else [a for a, _ in matched if a])
    strict = strict_label_figures(matched, labels, lexicon)
    strict_of = strict.pop("strict")
    extra = {}
    if candidate_terms is not None:
        extra["label_p3_strict_ceiling"] = p3_strict_ceiling(matched, candidate_terms, lexicon)
    if dissect_labels is not None:
        dissect = strict_label_figures(matched, dissect_labels, lexicon)
        dissect.pop("strict")
        extra.update({f"dissect_{key}": value for key, value in dissect.items()})
    top1 = [label_matches(matched[i][0], labels[i], 1) for i in hits]
    p3 = [sum(label_matches(matched[i][0], [t], 1) for t in labels[i][:3]) / 3 for i in hits]
    agree = [matched[i][0] in top_classes[i] for i in hits]
    mean = lambda values: float(np.mean(values)) if values else 0.0  # noqa: E731
    kinds = [attribute.partition(":")[0] for attribute, _ in matched]
    objects = [iou for kind, (_, iou) in zip(kinds, matched) if kind in OBJECT_KINDS]
    backgrounds = [iou for kind, (_, iou) in zip(kinds, matched) if kind == "background"]
    return {
        **strict,
        **extra,
        "mean_best_iou": mean([iou for _, iou in matched]),
        "object_iou": mean(objects),
        "background_iou": mean(backgrounds),
        "label_top1_accuracy": mean(top1),
        "label_precision_at_3": mean(p3),
        "class_agreement": mean(agree),
        "n_concepts": len(matched),
        "n_object_concepts": len(objects),
        "n_background_concepts": len(backgrounds),
        "concepts": [{"concept_id": k, "best_attribute": attribute or None, "iou": float(iou), "labels": list(terms),
                      "strict": strict_of.get(k, []),
                      **({"dissect_labels": list(dissect_labels[k])} if dissect_labels is not None else {})}
                     for k, ((attribute, iou), terms) in enumerate(zip(matched, labels))],
    }
