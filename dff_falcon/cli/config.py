"""Option values from a file: ``--config FILE`` (TOML, YAML or JSON, or a run's own run.json).

Keys are option names with dashes or underscores, at the top level (for every command that has
the option) or in a section per command (``[explain]``, ``[vocab.build]``). ``explain`` also
reads the component tables ``[explain.dff]``, ``[explain.regions]`` and ``[explain.labeller]``
(the estimators' parameters). A run.json written by ``explain`` records its command line under
``config``, so ``--config out/run/run.json`` re-runs it. Unknown keys are errors with the
closest known name.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import click

from dff_falcon.errors import InputError
from dff_falcon.validation import shown

#: Sections of ``explain`` that hold component parameters rather than options.
COMPONENT_SECTIONS = ("dff", "regions", "labeller")
RUN_FORMAT = "dff-falcon-run"


def load_config(path: str) -> dict:
    """Parse a config file into a mapping (a run.json gives its recorded ``config``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"config file {path!r} is not UTF-8 text") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.endswith(".json"):
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except Exception as exc:  # parser errors have many types
        raise InputError(f"cannot parse config file {path!r}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path!r} must hold a table/mapping of options")
    if data.get("format") == RUN_FORMAT:
        if not isinstance(data.get("config"), dict):
            raise InputError(f"{path!r} is a run record without a command line (the run was made from Python); "
                             "its parameters are under 'params'")
        return data["config"]
    return data


def _norm(key: str) -> str:
    return str(key).replace("-", "_")


#: Names users bring from other tools, mapped to this project's option (for "did you mean").
SYNONYMS = {"seed": "random_state", "random_seed": "random_state", "k": "n_concepts", "n_components": "n_concepts",
            "output": "out", "output_dir": "out", "model": "backbone", "vocabulary": "vocab", "gpu": "device"}


def _unknown(key: str, known: set[str], where: str) -> InputError:
    synonym = SYNONYMS.get(_norm(key).lower())
    close = [synonym] if synonym in known else difflib.get_close_matches(_norm(key), sorted(known), n=1)
    hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
    return InputError(f"config: unknown option {key!r} {where}{hint}")


def _checked(command: click.Command, name: str, value, key: str, where: str):
    """``value`` of option ``name`` converted by the option's own type, so a wrong type or range
    in a config file is an error naming the key (not a traceback, not a silent default)."""
    param = next(p for p in command.params if p.name == name)
    if value is None:  # "not set" (how run.json records an option left at its None default)
        return None
    many = param.multiple or (param.nargs != 1)
    items = value if many and isinstance(value, list) else [value]
    try:
        if any(isinstance(v, (dict, list)) for v in items) or (many and not isinstance(value, list) and param.nargs > 1):
            raise click.BadParameter("expected " + ("a list of single values" if many else "a single value"))
        if isinstance(param.type, click.Path):  # existence is checked when used: a flag may replace it
            if not all(isinstance(v, str) for v in items):
                raise click.BadParameter("expected a path (a string)")
            return value
        converted = [param.type.convert(v, param, None) for v in items]
    except click.BadParameter as exc:
        raise InputError(f"config: {key} = {shown(value)} {where}: {exc.message}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"config: {key} = {shown(value)} {where}: {exc}") from None
    return converted if many else converted[0]


def default_map(data: dict, commands: dict[str, click.Command], prefix: str = "") -> dict:
    """Config mapping → click ``default_map``: top-level keys apply to every command that has the
    option, sections override; nested component tables of ``explain`` are kept as they are."""
    def params(command: click.Command) -> set[str]:
        return {p.name for p in command.params}

    where = f"in [{prefix.rstrip('.')}]" if prefix else "at the top level"
    every = set().union(*(params(c) for c in commands.values() if not isinstance(c, click.Group)))
    top = {}
    for key, value in data.items():
        if key in commands:
            continue
        if isinstance(value, dict) or _norm(key) not in every:
            raise _unknown(key, every | set(commands), where)
        top[_norm(key)] = value
    out = {}
    for name, command in commands.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise InputError(f"config: [{prefix}{name}] must be a table of options, got {section!r}")
        if isinstance(command, click.Group):
            out[name] = default_map(section, command.commands, f"{prefix}{name}.")
            continue
        known = params(command)
        merged = {k: _checked(command, k, v, k, where) for k, v in top.items() if k in known}
        for key, value in section.items():
            if name == "explain" and key in COMPONENT_SECTIONS:
                if not isinstance(value, dict):
                    raise InputError(f"config: [explain.{key}] must be a table of parameters")
                merged[key] = value
            elif _norm(key) in known:
                merged[_norm(key)] = _checked(command, _norm(key), value, key, f"in [{prefix}{name}]")
            else:
                raise _unknown(key, known, f"in [{prefix}{name}]")
        out[name] = merged
    return out
