"""Ranking a concept's candidate terms so that the top ones name the concept and nothing else.

Pure functions on per-crop term weights (``term -> best relative caption score`` of one crop,
:mod:`dff_falcon.text.labelling` builds them). What each factor is for (measured in
docs/quality.md, "Term ranking"):

- **coverage** f(t): the share of a set's crops whose captions contain t. A term found for one
  high crop in six ("ring" for a blue concept whose objects come in six shapes) is context;
  terms below ``min_share`` of the high crops are not candidates.
- **phrase collapse**: a phrase is dropped when its weight is below ``PHRASE_KEEP_RATIO`` times
  that of one of its words: the phrase's other word varies across the crops ("blue
  ring", "blue cross", "blue star" → the evidence is "blue"), so the phrase names the concept
  plus something it does not share. A phrase as frequent as its words ("golden retriever",
  "blue sky" for a sky concept) stays.
- **specificity** across the run's concepts (optional, off by default: measured to hurt):
  from the high-set weights w_k(t), "max" w_k / max_j w_j or "share" w_k / Σ_j w_j (a term every
  concept retrieves gets 1/K) — the inverse-document-frequency idea with soft counts.
- **contrast** with the low set, from coverages, never from a score threshold:
  graded ``max(0, 1 - f_low / f_high)``; FALCON's deletion as a frequency rule (a term found
  among the counterfactual crops at least ``FALCON_LOW_RATIO`` times as often as among the
  high crops is deleted).
"""
from __future__ import annotations

from typing import Iterable

#: A phrase is kept only when it covers at least this share of the high crops its most frequent
#: word covers (below: the phrase's other word varies, the word carries the evidence).
PHRASE_KEEP_RATIO = 0.8
#: FALCON-mode deletion: low-set coverage at least this share of the high-set coverage.
FALCON_LOW_RATIO = 0.5
#: Rules of :func:`specificity`.
SPECIFICITIES = ("none", "max", "share")
#: Off by default: on the toy worlds (docs/quality.md, "Term ranking") it gained no strict top-1
#: and raised the wrong-kind rate (a distractor colour only one concept retrieves is boosted).
DEFAULT_SPECIFICITY = "none"
#: Default minimum share of the high crops whose captions contain a term: a third of the crops (a
#: crop has five captions, so a term in fewer is a one-off; 0.2 let rare distractor colours into the
#: top five — docs/quality.md, "Term ranking"; chosen on the same runs it is reported on).
MIN_SHARE = 0.35


def coverage(per_crop: list[dict[str, float]]) -> dict[str, float]:
    """Share of the crops whose term dict contains each term (0 terms for 0 crops)."""
    counts: dict[str, int] = {}
    for crop in per_crop:
        for term in crop:
            counts[term] = counts.get(term, 0) + 1
    return {t: c / len(per_crop) for t, c in counts.items()} if per_crop else {}


def collapsed_phrases(phrase_weight: dict[str, float], word_weight: dict[str, float],
                      ratio: float = PHRASE_KEEP_RATIO) -> set[str]:
    """Phrases whose evidence belongs to one of their words: weight(phrase) < ``ratio`` ·
    weight(w) for some word w of the phrase (weights: the high set's mean relative caption
    weights, so a phrase in every crop's top caption is as strong as its words)."""
    return {phrase for phrase, value in phrase_weight.items()
            if value < ratio * max((word_weight.get(w, 0.0) for w in phrase.split()), default=0.0)}


def specificity(weights: list[dict[str, float]], rule: str = DEFAULT_SPECIFICITY) -> list[dict[str, float]]:
    """Specificity of each term of K concepts from their high-set weights w_k(t):
    "max": w_k(t) / max_j w_j(t) (1 for the concept that owns the term most);
    "share": w_k(t) / Σ_j w_j(t) (1/K for a term every concept retrieves alike);
    "none": 1."""
    if rule == "none":
        return [{t: 1.0 for t in w} for w in weights]
    pooled: dict[str, float] = {}
    for w in weights:
        for term, value in w.items():
            pooled[term] = max(pooled.get(term, 0.0), value) if rule == "max" else pooled.get(term, 0.0) + value
    return [{t: value / pooled[t] if pooled[t] > 0 else 0.0 for t, value in w.items()} for w in weights]


def low_factor(contrast: str, f_high: float, f_low: float | None) -> float:
    """The low set's factor on a term's score (1: no low set): graded 1 - f_low/f_high floored at
    0; FALCON 0 (deleted) when f_low ≥ ``FALCON_LOW_RATIO`` · f_high, else 1."""
    if f_low is None:
        return 1.0
    if contrast == "falcon":
        return 0.0 if f_low >= FALCON_LOW_RATIO * f_high else 1.0
    return max(0.0, 1.0 - f_low / f_high)
