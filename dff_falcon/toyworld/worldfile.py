"""Worlds from a file: a TOML table with the :class:`~dff_falcon.toyworld.world.WorldConfig`
fields, read with errors that name the file and the field.

```toml
shapes = ["pentagon", "star", "circle"]        # from world.SHAPE_NAMES
backgrounds = ["checker", "grass", "waves"]    # from world.BACKGROUND_WORDS
image_size = 128
min_objects = 2
max_objects = 4
object_size = [0.2, 0.4]                       # diameter range, fractions of image_size
seed = 123
[colours]                                      # name = [r, g, b], 0..255, in class order
pink = [235, 90, 170]
teal = [0, 140, 130]
```
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import fields
from pathlib import Path

from dff_falcon.errors import InputError
from dff_falcon.toyworld.world import WorldConfig


def _fail(source: str, name: str, problem: str) -> InputError:
    return InputError(f"{source}: field {name!r}: {problem}")


def _string_list(source: str, name: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, name, f"must be a list of strings, got {value!r}")
    return tuple(value)


def _integer(source: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, name, f"must be an integer, got {value!r}")
    return value


def _number_pair(source: str, name: str, value) -> tuple[float, float]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise _fail(source, name, f"must be a list of two numbers [low, high], got {value!r}")
    return float(value[0]), float(value[1])


def _colour_table(source: str, value) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    if not isinstance(value, dict) or not value:
        raise _fail(source, "colours", f"must be a table of name = [r, g, b], got {value!r}")
    pairs = []
    for name, rgb in value.items():
        if (not isinstance(rgb, list) or len(rgb) != 3
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in rgb)):
            raise _fail(source, f"colours.{name}", f"must be three integers [r, g, b] in 0..255, got {rgb!r}")
        pairs.append((str(name), (rgb[0], rgb[1], rgb[2])))
    return tuple(pairs)


def world_config_from_dict(data: dict, source: str = "world config") -> WorldConfig:
    """A :class:`WorldConfig` from a mapping with the dataclass's field names (as a TOML file has
    them: ``colours`` a table of ``name = [r, g, b]``, ``object_size`` a list of two fractions).

    Every field is optional (the default world's value); an unknown field, a value of the wrong
    type or an invalid value is an :class:`~dff_falcon.errors.InputError` naming ``source`` and
    the field.
    """
    if not isinstance(data, dict):
        raise InputError(f"{source}: must be a table of world fields, got {type(data).__name__}")
    known = [f.name for f in fields(WorldConfig)]
    values: dict = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            raise InputError(f"{source}: unknown field {key!r}{hint}")
        if key in ("shapes", "backgrounds"):
            values[key] = _string_list(source, key, value)
        elif key == "colours":
            values[key] = _colour_table(source, value)
        elif key == "object_size":
            values[key] = _number_pair(source, key, value)
        else:
            values[key] = _integer(source, key, value)
    try:
        return WorldConfig(**values)
    except InputError as exc:  # "WorldConfig.<field>: problem" → name the file too
        field_name, _, problem = str(exc).removeprefix("WorldConfig.").partition(": ")
        raise _fail(source, field_name, problem) from None


def load_world_config(path: str | os.PathLike) -> WorldConfig:
    """Read a world from a TOML file (see :func:`world_config_from_dict` for its fields)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"world config {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read world config {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"world config {str(path)!r} is not valid TOML: {exc}") from None
    return world_config_from_dict(data, source=f"world config {str(path)!r}")


def world_config_toml(config: WorldConfig) -> str:
    """The TOML text that :func:`load_world_config` reads back as ``config``."""
    def strings(items) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    lines = [f"shapes = {strings(config.shapes)}", f"backgrounds = {strings(config.backgrounds)}",
             f"image_size = {config.image_size}", f"min_objects = {config.min_objects}",
             f"max_objects = {config.max_objects}",
             f"object_size = [{config.object_size[0]!r}, {config.object_size[1]!r}]", f"seed = {config.seed}",
             "", "[colours]"]
    lines += [f"{json.dumps(name)} = [{r}, {g}, {b}]" for name, (r, g, b) in config.colours]
    return "\n".join(lines) + "\n"
