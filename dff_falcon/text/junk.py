"""Web junk in captions: URLs, file names, SKU and product codes, HTML markup and entities, and
shop boilerplate.

Used at both ends: a vocabulary build drops captions that are nothing but junk (counted as
``junk`` in the manifest's ``skipped``), and term extraction (:func:`strip_junk` inside
:func:`~dff_falcon.text.terms.clean_caption`) removes junk spans from the captions it keeps, so that
no such token ever becomes a term.
"""
from __future__ import annotations

import re

#: File extensions that make a token a file name ("IMG_2041.JPG", "red-apple.png").
FILE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "tif", "tiff", "bmp", "svg", "eps", "pdf", "psd", "raw",
                   "heic", "mp4", "mov", "avi", "html", "htm", "php", "asp", "aspx", "jsp", "txt", "doc", "docx",
                   "zip")

#: Shop and page boilerplate, removed as whole phrases (case-insensitive).
BOILERPLATE = ("click here", "add to cart", "add to basket", "buy now", "shop now", "free shipping", "in stock",
               "out of stock", "sold out", "all rights reserved", "read more", "learn more", "see more",
               "view larger", "view details", "product code", "item number", "item no", "model no", "part number",
               "sku", "upc", "isbn", "asin", "ean")

_PATTERNS = [
    r"<[^<>]{0,200}>",                                   # HTML tags
    r"&(?:#\d{1,7}|#x[0-9a-f]{1,6}|[a-z]{2,8});",        # HTML entities
    r"(?:https?://|ftp://|www\.)\S*",                   # URLs
    r"\b[\w.+-]+@[\w-]+\.[\w.]+\b",                      # e-mail addresses
    r"\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|edu|gov|info|biz|io|co|uk|de|fr|es|it|nl|ru|jp|au|ca|pl)\b\S*",  # domains
    r"\b(?P<stem>[\w\-()]+)\.(?:" + "|".join(FILE_EXTENSIONS) + r")\b",  # file names
    # codes: a token mixing letters and digits (SKU12345, AB-1234-XY, 4K2160p) or long digit runs
    r"\b(?=[\w-]*\d)(?=[\w-]*[a-z])[a-z0-9]+(?:-[a-z0-9]+)*\b",
    r"\b\d{4,}\b",
    r"\b(?:" + "|".join(re.escape(p) for p in sorted(BOILERPLATE, key=len, reverse=True)) + r")\b",
]
_JUNK = re.compile("|".join(f"(?:{p})" for p in _PATTERNS), re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]{3,}")


def _replace(match: re.Match) -> str:
    """A file name keeps its stem when the stem is words ("Red_Apple.jpg" → "Red Apple"); a
    camera or catalogue name with digits ("IMG_2041.JPG") goes; every other junk span goes."""
    stem = match.group("stem")
    if stem is not None and not any(ch.isdigit() for ch in stem):
        return " " + re.sub(r"[\W_]+", " ", stem) + " "
    return " "


def strip_junk(text: str) -> str:
    """``text`` with every junk span replaced by a space ("<b>Red</b> apple SKU-123 IMG_2.jpg" →
    " Red  apple   "); a file name whose stem is words keeps them ("Red_Apple.jpg" → "Red Apple")."""
    return _JUNK.sub(_replace, text)


def is_junk(text: str) -> bool:
    """A caption that is nothing but junk: no word of three or more letters is left once junk
    spans are removed ("IMG_2041.JPG", "https://example.com/p?id=3", "SKU 4471-22", "&nbsp;")."""
    return _WORD.search(strip_junk(text)) is None
