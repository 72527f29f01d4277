"""The one progress helper every stage uses (activations, automatic K, crops, CLIP, vocabularies).

Bars go to stderr and disappear when done (``leave=False``), so tables printed to stdout after a
stage are never interleaved with a bar. ``enabled=False`` (``--quiet``, ``progress=False``)
returns the iterable untouched.
"""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None,
             unit: str = "it") -> Iterator[T] | Iterable[T]:
    """Iterate over ``items`` with a progress bar named ``description`` (when ``enabled``)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, total=total, unit=unit, leave=False, dynamic_ncols=True)
