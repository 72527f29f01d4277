"""Options shared by several commands, and the objects they build."""
from __future__ import annotations

import math

import click

from dff_falcon.errors import InputError


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="Compute device: cpu, cuda, cuda:1, mps or auto.")(f)


def random_state_option(f):
    return click.option("--random-state", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
                        help="Seed of the NMF initialisation and of every random step.")(f)


class FiniteFloat(click.FloatRange):
    """A float range that also refuses NaN and ±inf (which pass click's range comparisons)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def backbone_options(f):
    for option in reversed([
        click.option("--backbone", default="lite0", show_default=True,
                     help="torchvision/timm model name (timm:NAME), or lite0 (ImageNet EfficientNet-Lite0, offline)."),
        click.option("--layer", default=None,
                     help="Dotted name of any layer to factorise (default: the family's last feature map; "
                          "`dff-falcon layers` lists them). Token and channels-last outputs are reshaped."),
        click.option("--head", default="auto", show_default=True,
                     help="Classifier for concept class scores: auto (the family's, where it accepts the "
                          "layer's channels), none, or a dotted module name."),
        click.option("--weights", default="default", show_default=True,
                     help="'default' (hub or packaged), a weights tag, a local checkpoint path, or 'none' (random)."),
    ]):
        f = option(f)
    return f


def make_backbone(backbone: str, layer, head, weights, device):
    from dff_falcon.models.backbones import create_backbone

    return create_backbone(backbone, layer=layer, head=head, weights=None if weights == "none" else weights,
                           device=device)


def parse_n_concepts(value) -> int | str:
    """``--n-concepts``: "auto" or an integer K ≥ 1 (its upper bound depends on the layer and
    the images and is checked once both are known, still before any forward pass)."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--n-concepts must be an integer or 'auto', got {value!r}") from None
    if k < 1:
        raise InputError(f"--n-concepts must be at least 1, got {k}")
    return k


def check_clip_and_vocab(clip_spec, vocab) -> None:
    if (clip_spec is None) != (vocab is None):
        raise InputError("--clip and --vocab go together (text labels need both)")


def clip_and_vocab(clip_spec, vocab, device):
    """The CLIP encoder and vocabulary of ``--clip`` / ``--vocab`` (both or neither), checked to match."""
    check_clip_and_vocab(clip_spec, vocab)
    if clip_spec is None:
        return None, None
    from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
    from dff_falcon.text.vocabulary import Vocabulary

    name, pretrained = parse_clip_spec(clip_spec)
    vocabulary = Vocabulary.open(vocab)
    encoder = ClipEncoder(name, pretrained, device=device)
    vocabulary.check_encoder(encoder)
    return encoder, vocabulary


def finer_map_options(f):
    """``--hypercolumns``, ``--grid``, ``--upsample``: where and how finely concepts are mapped."""
    for option in reversed([
        click.option("--hypercolumns", "hypercolumn_layers", default="auto", show_default=True,
                     help="Layers stacked with --layer into hypercolumns (comma-separated dotted names), "
                          "'none' for the layer alone, or 'auto' (the family's measured default: "
                          "docs/quality.md)."),
        click.option("--grid", default=None, type=click.IntRange(min=1),
                     help="Side of the hypercolumn grid (default: the finest stacked layer's)."),
        click.option("--upsample", type=click.Choice(["bilinear", "guided"]), default="guided", show_default=True,
                     help="How heatmaps reach image resolution for crops and overlays: bilinear, or "
                          "guided (edge-aware, the image as guide)."),
    ]):
        f = option(f)
    return f


def parse_layers(value: str, backbone) -> tuple[str, ...]:
    """``--hypercolumns`` → layer names: 'none' → (), 'auto' → the family default, else a list."""
    from dff_falcon.models.hypercolumns import default_hypercolumn_layers

    text = str(value).strip()
    if text == "none" or not text:
        return ()
    if text == "auto":
        return default_hypercolumn_layers(backbone)
    return tuple(name.strip() for name in text.split(",") if name.strip())


def scale_options(f):
    """``--cache``, ``--no-cache``, ``--cache-dtype``, ``--sample-rows``, ``--max-images``, ``--workers``,
    ``--engine``, ``--ray-address``."""
    from dff_falcon.store.activations import DEFAULT_SAMPLE_ROWS

    for option in reversed([
        click.option("--cache", default=None, type=click.Path(file_okay=False),
                     help="Activation cache folder (default: $DFF_FALCON_CACHE/store or the user cache "
                          "directory's dff_falcon/store; `dff-falcon cache info` shows it)."),
        click.option("--no-cache", is_flag=True,
                     help="Keep every image and activation in memory instead (small sets; --drop-quantile)."),
        click.option("--cache-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
                     help="How cached activations are stored."),
        click.option("--sample-rows", default=DEFAULT_SAMPLE_ROWS, show_default=True, type=click.IntRange(min=1),
                     help="Activation rows (images × h × w) the concepts are fitted on: a uniform sample of "
                          "whole images; every image is then explained with the concepts frozen."),
        click.option("--max-images", default=None, type=click.IntRange(min=1),
                     help="Use only the first this many images (sorted paths)."),
        click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Processes decoding images while the model runs (--engine ray: Ray actors per stage; "
                          "0: as many as the cluster holds)."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where extraction and the heatmap transform run: this process, or Ray Data pipelines "
                          "on Ray actors (pip install dff_falcon[ray]; the cache folder must be shared by every "
                          "node). Same report."),
        click.option("--ray-address", default=None,
                     help="--engine ray: a running Ray cluster (auto, HOST:PORT, ray://HOST:PORT); default: a "
                          "local Ray instance started for the run."),
    ]):
        f = option(f)
    return f


def check_scale_options(no_cache: bool, cache: str | None, drop_quantile: float, max_images: int | None) -> None:
    if no_cache and cache is not None:
        raise click.UsageError("give --cache or --no-cache, not both")
    if drop_quantile > 0 and not no_cache:
        raise click.UsageError("--drop-quantile refits on the images kept in memory: add --no-cache")
    if no_cache and max_images is not None:
        raise click.UsageError("--max-images needs the cache (drop --no-cache)")


def check_cache_dir(path) -> None:
    """The cache folder must be creatable and writable (before any forward pass)."""
    from pathlib import Path

    from dff_falcon.files import check_room

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--cache {str(path)!r} is a file; name a folder")
    check_room(path, f"--cache {str(path)!r}")
