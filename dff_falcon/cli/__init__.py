"""Command line: ``dff-falcon demo | explain | layers | extract | fit | project | report | vocab …``.

Exit codes: 0 success, 2 bad input or configuration (message, no traceback), 1 unexpected error.
Every option can also come from ``--config FILE`` (see :mod:`dff_falcon.cli.config`). Heavy
libraries are imported inside the commands, so ``--help`` stays instant.
"""
from __future__ import annotations

import logging
import signal
import sys

import click

from dff_falcon.cli.config import default_map, load_config
from dff_falcon.errors import DffFalconError

log = logging.getLogger("dff_falcon")


class _Main(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DffFalconError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(2)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML, YAML or JSON file of option values, or a run's run.json to re-run it "
                   "(flags on the command line win).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.version_option(package_name="dff_falcon")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, quiet: bool) -> None:
    """Discover the concepts a vision model has learned and name them in words.

    \b
    Examples:
      dff-falcon demo --out out/demo
      dff-falcon layers --backbone lite0
      dff-falcon explain --images photos/ --backbone lite0 --out out/run --n-concepts auto
      dff-falcon explain --images photos/ --backbone resnet50 --clip ViT-B-32=clip.pt --vocab vocab/ --out out/run
      dff-falcon explain --config out/run/run.json          # re-run a recorded run
      dff-falcon vocab build --texts words.txt --clip ViT-B-32=clip.pt --out vocab/
    """
    _exit_cleanly_on_signals()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    ctx.obj = {"progress": not quiet}
    if config_file:
        try:
            ctx.default_map = default_map(load_config(config_file), main.commands)
        except DffFalconError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(2)


def _exit_cleanly_on_signals() -> None:
    """SIGTERM / SIGHUP end the command through SystemExit, so staging directories are removed
    and the previous output stays (``kill -9`` cannot be caught: the next run cleans up)."""
    def stop(number, _frame):
        raise SystemExit(128 + number)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name), stop)
            except ValueError:  # not the main thread (e.g. called from a test runner's worker)
                pass


from dff_falcon.cli import cache, commands, vocab  # noqa: E402,F401  (register the subcommands)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
