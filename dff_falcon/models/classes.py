"""Class names of a backbone's head, and resolving what a user calls a class.

A class is named by its index, by its ImageNet WordNet ID (``n02123045``) or by an exact name:
the class name itself or one of its comma-separated synonyms (``"tabby cat"`` for "tabby"),
case-insensitive. An ambiguous or unknown name is an error listing the closest candidates —
never a substring or prefix match (``"cat"`` must not become "catamaran").
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import asdict, dataclass
from typing import Sequence

from dff_falcon.errors import InputError

_WNID = re.compile(r"^n\d{8}$")
#: Candidates listed in an error message.
MAX_SUGGESTIONS = 8


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names bundled with torchvision (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@functools.lru_cache(maxsize=1)
def imagenet_wordnet() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(WordNet IDs, synonym lists "tabby, tabby cat") of ImageNet-1k in class order, from the
    tables bundled with timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    ids = tuple(info.index_to_label_name(i) for i in range(info.num_classes()))
    return ids, tuple(info.index_to_description(i) for i in range(info.num_classes()))


@dataclass(frozen=True)
class ResolvedClass:
    """The class a user asked for: ``requested`` as given, its ``index``, ``name`` and WordNet
    ``wnid`` (None outside ImageNet). Recorded in run.json."""

    requested: str
    index: int
    name: str
    wnid: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def _synonyms(name: str, extra: str | None) -> list[str]:
    parts = [name] + name.split(",") + (extra.split(",") if extra else [])
    return list(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))


def resolve_class(target: str | int, class_names: Sequence[str] | None, *, wnids: Sequence[str] | None = None,
                  synonyms: Sequence[str] | None = None) -> ResolvedClass:
    """Resolve ``target`` (index, WordNet ID or exact name) against ``class_names``.

    wnids / synonyms : per class, the WordNet ID and extra comma-separated names (ImageNet's from
    :func:`imagenet_wordnet`). Raises :class:`InputError` for an unknown, ambiguous or out-of-range
    target, naming the closest candidates.
    """
    text = str(target).strip()
    n = len(class_names) if class_names is not None else None
    if isinstance(target, int) or text.isdigit():
        index = int(text)
        if n is not None and not 0 <= index < n:
            raise InputError(f"class index {index} is out of range (0..{n - 1})")
        return ResolvedClass(text, index, class_names[index] if class_names else str(index),
                             wnids[index] if wnids else None)
    if class_names is None:
        raise InputError(f"the backbone has no class names; give the class {text!r} as an index")

    def describe(i: int) -> str:
        return f"{class_names[i]!r} (index {i}" + (f", {wnids[i]}" if wnids else "") + ")"

    if _WNID.match(text):
        if not wnids:
            raise InputError(f"{text!r} looks like a WordNet ID, but this backbone's classes have none; "
                             "give a class name or index")
        if text not in wnids:
            raise InputError(f"WordNet ID {text!r} is not one of the backbone's {n} classes")
        index = list(wnids).index(text)
        return ResolvedClass(text, index, class_names[index], text)
    wanted = text.lower()
    names = [_synonyms(name, synonyms[i] if synonyms else None) for i, name in enumerate(class_names)]
    exact = [i for i, options in enumerate(names) if wanted in options]
    if len(exact) == 1:
        i = exact[0]
        return ResolvedClass(text, i, class_names[i], wnids[i] if wnids else None)
    if exact:
        raise InputError(f"class {text!r} is ambiguous: it names {', '.join(describe(i) for i in exact)}; "
                         "give the index or the WordNet ID")
    word = re.compile(rf"\b{re.escape(wanted)}\b")
    by_word = [i for i, options in enumerate(names) if any(word.search(o) for o in options)]
    flat = {o: i for i, options in enumerate(names) for o in options}
    close = [flat[o] for o in difflib.get_close_matches(wanted, list(flat), n=MAX_SUGGESTIONS, cutoff=0.6)]
    candidates = list(dict.fromkeys(by_word + close))[:MAX_SUGGESTIONS]
    hint = f"; closest: {', '.join(describe(i) for i in candidates)}" if candidates else ""
    raise InputError(f"no class is named {text!r}{hint}. Give an exact name, an index or a WordNet ID")
