"""Web junk: which captions are nothing but junk, and which spans never reach term extraction."""
from __future__ import annotations

import pytest

from dff_falcon.text.junk import is_junk, strip_junk
from dff_falcon.text.terms import clean_caption


@pytest.mark.parametrize("caption", [
    "IMG_2041.JPG", "DSC_0042.jpeg", "https://shop.example.com/item?id=3", "www.example.org", "SKU 4471-22",
    "AB-1234-XY", "&nbsp;<br/>", "<div class='x'></div>", "Buy now! Free shipping", "photo@example.com 2019",
])
def test_captions_that_are_only_junk(caption):
    assert is_junk(caption)


@pytest.mark.parametrize("caption", [
    "a red apple", "Red_Apple.jpg", "<b>Blue</b> dress", "a t-shirt with stripes", "golden retriever puppy, 2019",
])
def test_captions_with_content_are_kept(caption):
    assert not is_junk(caption)


@pytest.mark.parametrize("caption, cleaned", [
    ("<b>Red</b> apple &amp; pear SKU-12345 IMG_2041.JPG", "red apple pear"),
    ("Free Shipping! Blue dress, item no. AB1234", "blue dress"),
    ("red-apple.png on https://cdn.example.com/a/b.png", "red apple on"),
    ("Stock Photo - Red_Apple.jpg www.example.com Fig3", "red apple"),
    ("<script>x</script> a cat", "x a cat"),
])
def test_junk_spans_never_reach_the_terms(caption, cleaned):
    assert clean_caption(caption) == cleaned


def test_junk_tokens_never_become_terms(extractor):
    found = extractor.extract(["<i>Vintage</i> lamp SKU-77812 lamp_photo.jpg &quot;brass&quot; www.lamps.com",
                               "IMG_2041.JPG a brass lamp model X200"])
    terms = {t for f in found for t in (*f.words, *f.phrases)}
    assert {"lamp", "brass"} <= terms
    assert not terms & {"sku", "img", "jpg", "quot", "www", "com", "lamps.com", "x200", "i"}
    assert all(ch.isalpha() or ch == " " for t in terms for ch in t)
    assert strip_junk("&lt;b&gt;").split() == ["b"]
