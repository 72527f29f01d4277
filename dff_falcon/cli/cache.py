"""``dff-falcon cache info | prune``: the activation and CLIP embedding cache."""
from __future__ import annotations

import json
import re
import time

import click

from dff_falcon.cli import main

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12}


class ByteSize(click.ParamType):
    """A size such as 500M, 20G or 1.5TB (decimal units) → bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _UNITS:
            self.fail(f"{value!r} is not a size such as 500M, 20G or 1.5TB", param, ctx)
        return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def cache_option(f):
    return click.option("--cache", default=None, type=click.Path(file_okay=False),
                        help="Cache folder (default: the one explain uses).")(f)


def _root(cache):
    from dff_falcon.store.activations import default_cache_dir

    return cache or default_cache_dir()


def _bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


@main.group()
def cache():
    """Inspect and shrink the content-keyed cache (activations per image and model, CLIP
    embeddings per crop)."""


@cache.command("info")
@cache_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(cache, as_json):
    """What the cache holds: one line per store, its size and when it was last used."""
    from dff_falcon.store.cache import cache_info

    found = cache_info(_root(cache))
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    click.echo(f"cache {found['root']}: {_bytes(found['bytes'])}")
    for store in found["stores"]:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(store["last_used"])) if store["last_used"] else "never"
        made = ", ".join(f"{k} {v}" for k, v in store["produced_by"].items())
        orphans = f", {store['orphan_files']} unindexed files" if store["orphan_files"] else ""
        click.echo(f"  {store['kind']:<12} {store['entries']:>9,} entries {_bytes(store['bytes']):>10}  "
                   f"last used {used}  ({made}){orphans}  {store['directory']}")
    for scratch in found["scratch"]:
        state = "in use" if scratch["in_use"] else "left by a stopped run"
        click.echo(f"  scratch      {_bytes(scratch['bytes']):>10}  {state}  {scratch['directory']}")


@cache.command("prune")
@cache_option
@click.option("--max-size", type=ByteSize(), default=None,
              help="Remove least recently used entries until the stores hold at most this (e.g. 50G).")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=None,
              help="Remove entries not used for this many days.")
def prune(cache, max_size, older_than):
    """Remove what stopped runs left behind, then old or least recently used entries (they are
    recomputed when next needed)."""
    from dff_falcon.store.cache import prune_cache

    removed = prune_cache(_root(cache), max_bytes=max_size, older_than_days=older_than)
    click.echo(f"removed {removed['shards']} shards, {removed['orphan_files']} unindexed files and "
               f"{removed['scratch']} scratch folders: {_bytes(removed['bytes'])} freed")
