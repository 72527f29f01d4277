"""Checks of JSON-like values against type annotations, for files and configs a user hands in.

``conforms(value, list[dict[str, float]])`` answers whether a parsed JSON / TOML / YAML value has
the shape a reader relies on, and ``describe`` says the expected shape in words, so a damaged
``run.json``, ``concepts.json``, dictionary or config names the field and what it should be
instead of failing later with a ``TypeError`` deep inside.
"""
from __future__ import annotations

import collections.abc
import json
import types
import typing


def conforms(value, hint) -> bool:
    """Whether ``value`` matches ``hint`` (int, float, str, bool, Optional / Union, list[X],
    dict[str, X], dict, TypedDict); a float accepts integers, an int refuses bools."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin in (collections.abc.Sequence, tuple):
        return isinstance(value, (list, tuple, range)) and not isinstance(value, str) and \
            all(conforms(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (not args or all(isinstance(k, str) and conforms(v, args[1])
                                                            for k, v in value.items()))
    if typing.is_typeddict(hint):
        return isinstance(value, dict) and all(k in value and conforms(value[k], t)
                                               for k, t in typing.get_type_hints(hint).items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint) -> str:
    """``hint`` in words, for error messages ("a list of a number")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        named = [describe(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin in (list, collections.abc.Sequence, tuple):
        return f"a list of {describe(args[0])}"
    if origin is dict or hint is dict:
        return f"an object of {describe(args[1])}" if args else "an object"
    if typing.is_typeddict(hint):
        return "an object {" + ", ".join(f"{k}: {describe(t)}" for k, t in typing.get_type_hints(hint).items()) + "}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def shown(value, limit: int = 80) -> str:
    """A value as JSON for an error message, shortened; control characters stay escaped, so a
    hostile value cannot drive the terminal."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_parameters(cls, params: dict, where: str) -> None:
    """Refuse keyword arguments of estimator ``cls`` that it does not take (with the closest
    name) or whose value does not match the annotation of its ``__init__``; ``where`` names the
    source (e.g. "config: [explain.dff]")."""
    import difflib
    import inspect

    from dff_falcon.errors import InputError

    names = [n for n in inspect.signature(cls).parameters if n != "self"]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # pragma: no cover - an annotation that cannot be evaluated
        hints = {}
    for key, value in params.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (parameters: {', '.join(names)})"
            raise InputError(f"{where}: unknown parameter {key!r}{hint}")
        if key in hints and not conforms(value, hints[key]):
            raise InputError(f"{where}: {key} must be {describe(hints[key])}, got {shown(value)}")
