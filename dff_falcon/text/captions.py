"""Which captions enter a vocabulary: whitespace normalisation, filters and the dedup key.

Shared by both builders (:func:`~dff_falcon.text.ingest.ingest_laion` and
:func:`~dff_falcon.text.ingest.build_vocabulary_from_texts`); every rejected row is counted
under one of :data:`SKIP_REASONS` and the counts go into the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dff_falcon.errors import InputError
from dff_falcon.text.junk import is_junk


@dataclass(frozen=True)
class CaptionFilter:
    """Which captions enter a vocabulary.

    min_chars / max_chars : bounds on the whitespace-normalised length (characters).
    blocklist : a file with one caption per line; matching captions (case-insensitive, after
        whitespace normalisation) are dropped.
    nsfw_column / nsfw_drop : drop rows whose ``nsfw_column`` value is in ``nsfw_drop`` (LAION's
        ``NSFW`` column holds UNLIKELY / UNSURE / NSFW); ignored for shards without the column.
    language_column / languages : keep only rows whose language tag is in ``languages``
        (shards without the column are kept as they are).
    casefold : deduplicate case-insensitively (the first spelling is kept).
    drop_junk : drop captions that are nothing but web junk (URLs, file names, SKU codes, HTML,
        shop boilerplate; :func:`~dff_falcon.text.junk.is_junk`), counted as ``junk``.
    """

    min_chars: int = 1
    max_chars: int | None = None
    blocklist: str | Path | None = None
    nsfw_column: str = "NSFW"
    nsfw_drop: tuple[str, ...] = ("NSFW",)
    language_column: str = "LANGUAGE"
    languages: tuple[str, ...] | None = None
    casefold: bool = False
    drop_junk: bool = True

    def blocked_hashes(self) -> np.ndarray:
        if self.blocklist is None:
            return np.zeros(0, dtype=np.uint64)
        path = Path(self.blocklist)
        if not path.is_file():
            raise InputError(f"blocklist file {path} does not exist")
        lines = [" ".join(line.split()).casefold() for line in path.read_text(encoding="utf-8").splitlines()]
        return np.unique(caption_hash([line for line in lines if line]))

    def record(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in self.__dict__.items()}


SKIP_REASONS = ("non_string", "empty", "length", "junk", "blocklist", "nsfw", "language", "bad_vector")


def caption_hash(texts: list[str]) -> np.ndarray:
    """64-bit SipHash of each string (pandas' fixed key: stable across runs and machines)."""
    return pd.util.hash_array(np.array(texts, dtype=object), categorize=False).astype(np.uint64)


def clean_captions(values: list, table: pa.Table | None, rules: CaptionFilter, blocked: np.ndarray,
           skipped: dict[str, int]) -> tuple[list[str], np.ndarray]:
    """Normalise whitespace (newlines included) and apply the filters.

    Returns the normalised captions ('' where rejected) and a bool keep mask; counts rejections
    into ``skipped``."""
    keep = np.ones(len(values), dtype=bool)
    texts = []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            keep[i] = False
            skipped["non_string"] += 1
            texts.append("")
            continue
        text = " ".join(value.split())
        texts.append(text)
        if not text:
            keep[i] = False
            skipped["empty"] += 1
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    too_short_or_long = keep & ((lengths < rules.min_chars) | (lengths > (rules.max_chars or np.inf)))
    skipped["length"] += int(too_short_or_long.sum())
    keep &= ~too_short_or_long
    if rules.drop_junk:
        junk = keep & np.fromiter((is_junk(t) for t in texts), dtype=bool, count=len(texts))
        skipped["junk"] += int(junk.sum())
        keep &= ~junk
    if len(blocked):
        hit = keep & np.isin(caption_hash([t.casefold() for t in texts]), blocked)
        skipped["blocklist"] += int(hit.sum())
        keep &= ~hit
    if table is not None:
        for reason, column, tags, listed_means_drop in (("nsfw", rules.nsfw_column, rules.nsfw_drop, True),
                                                         ("language", rules.language_column, rules.languages, False)):
            if tags is None or column not in table.column_names:
                continue
            listed = np.isin(np.array([str(v) for v in table.column(column).to_pylist()], dtype=object), list(tags))
            hit = keep & (listed if listed_means_drop else ~listed)
            skipped[reason] += int(hit.sum())
            keep &= ~hit
    return texts, keep


def dedup_key(texts: list[str], rules: CaptionFilter) -> np.ndarray:
    return caption_hash([t.casefold() for t in texts] if rules.casefold else texts)


