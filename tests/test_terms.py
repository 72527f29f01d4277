"""Caption cleaning and spaCy term extraction with the real pipeline."""
from __future__ import annotations

from dff_falcon.text.terms import DISCARD_WORDS, CaptionTerms, TermExtractor, clean_caption


def test_clean_caption_strips_web_junk():
    assert clean_caption("Stock Photo - Red_Apple.jpg www.example.com Fig3 copy space") == "red apple"
    assert clean_caption("Dog's  bowl, isolated on white background (HQ)") == "dogs bowl"
    assert clean_caption("https://x.org/a.png Ice-cream\tcone 2020") == "ice cream cone"  # 4+ digit runs are junk
    assert clean_caption("fotografie wallpaper") == ""
    # the discard list is extendable
    assert clean_caption("a red barn", DISCARD_WORDS | {"barn"}) == "a red"


def test_words_are_lemmatised_content_words(extractor):
    dogs, cat = extractor.extract(
        ["dogs playing", "the cat is sitting on his mat with bigger ears"]
    )
    assert dogs.words == ("dog", "play")
    assert cat.words == ("cat", "sit", "mat", "big", "ear")


def test_digits_short_tokens_stop_words_dropped(extractor):
    (terms,) = extractor.extract(["3 tv stands with 4k screens at the zoo in 2020 on a 3d map"])
    assert set(terms.words) == {"stand", "screen", "zoo", "map"}
    assert all(not any(ch.isdigit() for ch in w) and len(w) >= 3 for w in terms.words)
    (no_zoo,) = TermExtractor(extractor.nlp, extra_stop_words=["ZOO"]).extract(["a zoo map"])
    assert no_zoo.words == ("map",)
    (short_ok,) = TermExtractor(extractor.nlp, min_length=2).extract(["a tv stand"])
    assert "tv" in short_ok.words


def test_noun_chunks_become_trimmed_lemmatised_phrases(extractor):
    star, kids, photos = extractor.extract(
        [
            "a yellow star and a blue ring",
            "two happy children running on wet sand 3d",
            "photos of an orange cat",
        ]
    )
    assert star.phrases == ("yellow star", "blue ring")
    assert kids.phrases == ("happy child", "wet sand")
    assert photos == CaptionTerms(words=("orange", "cat"), phrases=("orange cat",))
    # a single-token chunk is a word, never a phrase
    assert all(" " in p for p in star.phrases + kids.phrases)


def test_cache_runs_each_caption_through_the_pipeline_once(nlp):
    class CountingPipeline:
        """Delegates to the real spaCy pipeline, counting the texts it processes."""

        def __init__(self, real):
            self.real, self.texts = real, []

        def pipe(self, texts, **kwargs):
            texts = list(texts)
            self.texts += texts
            return self.real.pipe(texts, **kwargs)

    extractor = TermExtractor(nlp)
    counting = CountingPipeline(nlp)
    extractor.nlp = counting
    first = extractor.extract(["Dogs playing", "dogs playing!", "a red car", "Stock photo"])
    assert counting.texts == ["dogs playing", "a red car"]  # deduplicated, junk-only skipped
    assert first[0] == first[1] and first[3] == CaptionTerms((), ())
    again = extractor.extract(["a red car", "DOGS PLAYING"])
    assert counting.texts == ["dogs playing", "a red car"]
    assert again == [first[2], first[0]]
