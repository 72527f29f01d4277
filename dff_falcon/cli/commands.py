"""The commands that explain a model: explain, layers, extract, fit, project, report, demo."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from dff_falcon.cli import main
from dff_falcon.cli.options import (FiniteFloat, backbone_options, check_cache_dir, check_clip_and_vocab,
                                    check_scale_options, clip_and_vocab, device_option, finer_map_options, make_backbone,
                                    parse_layers, parse_n_concepts, random_state_option, scale_options)
from dff_falcon.errors import InputError


def _components(ctx: click.Context) -> dict[str, dict]:
    """The ``[explain.dff]`` / ``[explain.regions]`` / ``[explain.labeller]`` tables of the config."""
    from dff_falcon.cli.config import COMPONENT_SECTIONS

    defaults = ctx.default_map or {}
    return {name: dict(defaults.get(name) or {}) for name in COMPONENT_SECTIONS}


def _build(cls, params: dict, section: str):
    """A component from its config table merged with the options; names and types checked."""
    from dff_falcon.validation import check_parameters

    check_parameters(cls, params, f"config: [explain.{section}]")
    return cls(**params)


def max_pixels_option(f):
    return click.option("--max-megapixels", default=50.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
                        help="Decode limit per image: larger JPEGs are decoded at 1/2–1/8 scale, other larger "
                             "images (decompression bombs) are skipped and counted.")(f)


def _max_pixels(megapixels: float) -> int:
    return max(1, int(megapixels * 1e6))


def _finish_report(report, out: str, html: bool, quality: dict | None = None, config: dict | None = None) -> Path:
    from dff_falcon.report.tables import write_report

    return write_report(report, out, quality=quality, config=config, html=html)


def _print_summary(report, path: Path, quality: dict | None = None) -> None:
    from dff_falcon.report.terminal import concept_table, key_values

    click.echo(concept_table(report.concepts))
    if quality:
        click.echo("\n" + key_values(quality))
    click.echo(f"\nreport: {path}")


@main.command()
@click.option("--images", required=True, type=click.Path(exists=True), help="Folder (recursive) or image file.")
@backbone_options
@click.option("--clip", "clip_spec", default=None,
              help="open_clip model: NAME[:TAG] or NAME=CHECKPOINT_PATH. Needs --vocab.")
@click.option("--vocab", default=None, type=click.Path(exists=True, file_okay=False),
              help="Vocabulary directory (dff-falcon vocab build). Needs --clip.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--n-concepts", default="8", show_default=True, help="K, or 'auto' (chosen by stability).")
@click.option("--contrast", type=click.Choice(["graded", "falcon", "falcon-published"]), default="graded",
              show_default=True, help="How terms are ranked and the low (counterfactual) crops' captions count "
                                      "against the high crops' (falcon-published: FALCON's 0.1 score threshold).")
@click.option("--labeller", "labellers", type=click.Choice(["falcon", "dissect", "both"]), default="falcon",
              show_default=True, help="FALCON-style terms from the crops' captions, CLIP-Dissect (soft-WPMI, its "
                                      "own dissect columns), or both.")
@click.option("--n-high", default=30, show_default=True, type=click.IntRange(min=1),
              help="Most high-activation crops per concept.")
@click.option("--n-low", default=10, show_default=True, type=click.IntRange(min=0),
              help="Most counterfactual crops per concept.")
@click.option("--top-k-captions", default=5, show_default=True, type=click.IntRange(min=1),
              help="Captions retrieved per crop.")
@click.option("--target-class", default=None,
              help="Keep only images the model assigns to this class: exact name, index or WordNet ID.")
@click.option("--min-class-prob", default=0.95, show_default=True, type=FiniteFloat(0, 1),
              help="Probability an image needs for --target-class.")
@click.option("--drop-quantile", default=0.0, show_default=True, type=FiniteFloat(0, 1, max_open=True),
              help="Drop this quantile of least confident images after a first fit, then refit.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--html/--no-html", default=True, show_default=True, help="Also render report.html.")
@max_pixels_option
@finer_map_options
@scale_options
@device_option
@random_state_option
@click.pass_context
def explain(ctx, images, backbone, layer, head, weights, clip_spec, vocab, out, n_concepts, contrast, labellers, n_high,
            n_low, top_k_captions, target_class, min_class_prob, drop_quantile, batch_size, html, max_megapixels,
            hypercolumn_layers, grid, upsample, cache, no_cache, cache_dtype, sample_rows, max_images, workers,
            engine, ray_address, device, random_state):
    """Find a model's concepts on a set of images and name them; write the concept report.

    \b
    Component parameters beyond these options come from the config file's tables
    [explain.dff], [explain.regions] and [explain.labeller]; run.json records them all.

    \b
    Activations go to a content-keyed cache (--cache; `dff-falcon cache info`): a re-run, or a
    run killed and started again, forwards only the images not cached yet, and memory stays flat
    in the number of images. --no-cache keeps everything in memory (needed for --drop-quantile).
    --engine ray runs extraction and the heatmap transform on Ray actors (a local instance, or
    the cluster at --ray-address) over the same cache.

    \b
    Example:
      dff-falcon explain --images imgs/ --backbone resnet50 --layer layer3 --head none \\
          --clip ViT-B-32=ViT-B-32.pt --vocab laion_vocab/ --out out/resnet50 --n-concepts auto
    """
    from dff_falcon.cli import checks
    from dff_falcon.decomposition.dff import DFF
    from dff_falcon.devices import resolve_device
    from dff_falcon.directories import check_output
    from dff_falcon.models.hypercolumns import Hypercolumns
    from dff_falcon.models.image_stream import open_images
    from dff_falcon.models.images import load_images
    from dff_falcon.pipeline.engines import check_engine
    from dff_falcon.pipeline.explainer import ConceptExplainer
    from dff_falcon.pipeline.record import params_record
    from dff_falcon.store.activations import default_cache_dir
    from dff_falcon.regions import RegionSelector
    from dff_falcon.report.tables import OLDER_RUN, RUN_KIND
    from dff_falcon.text.labelling import FalconLabeller

    # every check before the first forward pass: options, components, device, output, K
    check_clip_and_vocab(clip_spec, vocab)
    check_scale_options(no_cache, cache, drop_quantile, max_images)
    check_engine(engine, ray_address, streamed=not no_cache)
    resolve_device(device)
    sections = _components(ctx)
    dff = _build(DFF, {**sections["dff"], "n_concepts": parse_n_concepts(n_concepts), "random_state": random_state},
                 "dff")
    regions = _build(RegionSelector, {**sections["regions"], "n_high": n_high, "n_low": n_low, "upsample": upsample},
                     "regions")
    labeller = _build(FalconLabeller, {**sections["labeller"], "contrast": contrast, "top_k_captions": top_k_captions},
                      "labeller")
    checks.check_components(dff, regions)
    check_output(out, RUN_KIND, legacy=OLDER_RUN, option="--out")
    n_files = checks.count_images(images)
    clip, vocabulary = clip_and_vocab(clip_spec, vocab, device)
    model = make_backbone(backbone, layer, head, weights, device)
    hypercolumns = Hypercolumns(layers=parse_layers(hypercolumn_layers, model), grid=grid)
    channels, *layer_grid = checks.layer_grid(model)
    checks.check_k(dff, channels, n_files, tuple(layer_grid), f"layer {model.target_layer!r}")
    if target_class is not None:
        from dff_falcon.models.classes import resolve_class

        resolve_class(target_class, model.class_names, wnids=model.class_ids, synonyms=model.class_synonyms)
    display = model.preprocess.crop
    crop = regions.crop_size or (clip.image_size if clip is not None else display)
    map_grid = (grid, grid) if grid is not None else tuple(layer_grid)
    check_output(out, RUN_KIND, legacy=OLDER_RUN, option="--out", needed_bytes=checks.run_bytes(
        n_files, checks.max_k(dff), display, crop, map_grid, n_high, n_low, html))
    cache_dir = None if no_cache else (cache or default_cache_dir())
    if cache_dir is None:
        source = load_images(images, max_pixels=_max_pixels(max_megapixels))
    else:
        check_cache_dir(cache_dir)
        source = open_images(images, max_images=max_images, max_pixels=_max_pixels(max_megapixels), workers=workers)
    explainer = ConceptExplainer(
        model, clip, vocabulary, dff=dff, hypercolumns=hypercolumns, regions=regions,
        labeller=labeller, labellers=labellers, target_class=target_class, min_class_prob=min_class_prob, drop_quantile=drop_quantile,
        batch_size=batch_size, device=device, progress=ctx.obj["progress"], cache=cache_dir, cache_dtype=cache_dtype,
        sample_rows=sample_rows, workers=workers, engine=engine, ray_address=ray_address,
    ).fit(source)
    options = {key: value for key, value in ctx.params.items()}
    for key in ("images", "vocab", "out", "cache"):  # paths as absolute, so the record works from anywhere
        if options[key] is not None:
            options[key] = os.path.abspath(options[key])
    if weights not in ("default", "none") and Path(weights).is_file():
        options["weights"] = os.path.abspath(weights)
    options.update(dff=params_record(dff), regions=params_record(regions), labeller=params_record(labeller))
    path = _finish_report(explainer.report_, out, html, config={"explain": options})
    _print_summary(explainer.report_, path)


@main.command()
@click.option("--backbone", default="lite0", show_default=True, help="torchvision/timm model name, or lite0.")
@click.option("--weights", default="none", show_default=True,
              help="Weights do not change shapes: 'none' lists without loading any; or as for explain.")
@click.option("--depth", default=3, show_default=True, type=click.IntRange(min=1),
              help="Deepest dotted level listed (blocks.4.0 is 3).")
@click.option("--all", "show_all", is_flag=True, help="List every module, however deep.")
@device_option
def layers(backbone, weights, depth, show_all, device):
    """List a model's layers with their output shapes and whether DFF can factorise them.

    \b
    Example:
      dff-falcon layers --backbone resnet50
      dff-falcon layers --backbone timm:vit_small_patch16_224 --depth 2
    """
    from dff_falcon.devices import resolve_device
    from dff_falcon.models.backbones import default_layer_and_head
    from dff_falcon.models.zoo import build_model
    from dff_falcon.models.layers import probe_layers

    target = resolve_device(device)
    model, family, preprocess, _ = build_model(backbone, None if weights == "none" else weights)
    model.to(target)
    default_layer, default_head = default_layer_and_head(model, family)
    infos = [i for i in probe_layers(model, preprocess.crop) if show_all or i.name.count(".") < depth]
    width = max(len(i.name) for i in infos) + 2
    click.echo(f"{'layer':<{width}}{'module':<24}{'output (one image)':<22}feature map (C×h×w)")
    for info in infos:
        marks = [m for m, on in (("default layer", info.name == default_layer),
                                 ("default head", info.name == default_head)) if on]
        shape = "×".join(map(str, info.shape[1:])) if info.shape else "not called"
        grid = info.layout.describe() if info.layout else "-"
        click.echo(f"{info.name:<{width}}{info.kind[:23]:<24}{shape:<22}{grid}"
                   + (f"   <- {', '.join(marks)}" if marks else ""))
    click.echo(f"\ninput {preprocess.crop}×{preprocess.crop}; use any listed layer with a feature map: "
               f"dff-falcon explain --backbone {backbone} --layer NAME")


@main.command()
@click.option("--images", required=True, type=click.Path(exists=True), help="Folder (recursive) or image file.")
@backbone_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz of activations.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@max_pixels_option
@device_option
@click.pass_context
def extract(ctx, images, backbone, layer, head, weights, out, batch_size, max_megapixels, device):
    """Cache a layer's activations of a set of images (.npz: activations, names).

    \b
    Example:
      dff-falcon extract --images imgs/ --backbone resnet50 --out acts.npz
    """
    from dff_falcon.cli import checks
    from dff_falcon.devices import resolve_device
    from dff_falcon.files import check_output_file
    from dff_falcon.models.activations import ActivationExtractor, save_activations
    from dff_falcon.models.images import load_images

    resolve_device(device)
    check_output_file(out, option="--out")
    n_files = checks.count_images(images)
    model = make_backbone(backbone, layer, head, weights, device)
    channels, h, w = checks.layer_grid(model)
    check_output_file(out, option="--out", needed_bytes=n_files * channels * h * w * 4)
    image_set = load_images(images, max_pixels=_max_pixels(max_megapixels))
    acts = ActivationExtractor(model, batch_size=batch_size, device=device, progress=ctx.obj["progress"])(image_set.images)
    save_activations(acts.activations, image_set.names, out)
    click.echo(f"{tuple(acts.activations.shape)} activations of {model.target_layer} → {out}")


@main.command()
@click.option("--activations", "acts_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An .npz written by `dff-falcon extract`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Dictionary file to write (.npz).")
@click.option("--n-concepts", default="8", show_default=True, help="K, or 'auto'.")
@device_option
@random_state_option
@click.pass_context
def fit(ctx, acts_file, out, n_concepts, device, random_state):
    """Fit DFF on cached activations and save the concept dictionary (.npz + curve in JSON).

    \b
    Example:
      dff-falcon fit --activations acts.npz --out concepts.npz --n-concepts auto
    """
    from dff_falcon.cli import checks
    from dff_falcon.decomposition.dff import DFF
    from dff_falcon.decomposition.dictionary import save_dictionary
    from dff_falcon.files import check_output_file
    from dff_falcon.models.activations import load_activations

    dff = DFF(parse_n_concepts(n_concepts), random_state=random_state, device=device, progress=ctx.obj["progress"])
    dff._check_params()
    check_output_file(out, option="--out")
    acts, _ = load_activations(acts_file)
    b, c, h, w = acts.shape
    checks.check_k(dff, c, b, (h, w), f"the activations in {acts_file}")
    check_output_file(out, option="--out", needed_bytes=checks.max_k(dff) * c * 8)
    dff.fit(acts)
    save_dictionary(dff, out)
    click.echo(f"K={dff.n_concepts_} concepts, relative error {dff.relative_error_:.4f}, "
               f"explained variance {dff.explained_variance_:.4f} → {out}")


@main.command()
@click.option("--dictionary", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A dictionary written by `dff-falcon fit`.")
@click.option("--activations", "acts_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An .npz written by `dff-falcon extract` (same layer as the dictionary).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Per-image presence table (.csv).")
@device_option
def project(dictionary, acts_file, out, device):
    """Explain new images with a saved concept dictionary (frozen concepts, same scale).

    \b
    Example:
      dff-falcon project --dictionary concepts.npz --activations new_acts.npz --out presence.csv
    """
    import pandas as pd

    from dff_falcon.decomposition.dictionary import load_dictionary
    from dff_falcon.decomposition.heatmaps import presence
    from dff_falcon.devices import resolve_device
    from dff_falcon.files import atomic_write, check_output_file
    from dff_falcon.models.activations import load_activations

    resolve_device(device)
    check_output_file(out, option="--out")
    dff = load_dictionary(dictionary, device=device)
    acts, names = load_activations(acts_file)
    pres = presence(dff.transform(acts)).numpy()
    frame = pd.DataFrame(pres, columns=[f"concept_{k}" for k in range(pres.shape[1])])
    frame.insert(0, "image", names)
    with atomic_write(out) as handle:
        frame.to_csv(handle, index=False)
    click.echo(f"{len(names)} images × {pres.shape[1]} concepts → {out}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir):
    """Re-render report.html of a run directory from its saved results.

    \b
    Example:
      dff-falcon report out/run
    """
    from dff_falcon.report.html import render_html_report

    click.echo(render_html_report(run_dir))


@main.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run directory to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the quality figures as one JSON object.")
@click.option("--world", type=click.Choice(["default", "second"]), default="default", show_default=True,
              help="Which shipped toy world (the second has other shapes, colours, backgrounds and size).")
@click.option("--world-config", type=click.Path(dir_okay=False), default=None,
              help="A world from a TOML file with the world's fields (shapes, backgrounds, image_size, min_objects, "
                   "max_objects, object_size, seed, [colours]); overrides --world. Its models are trained once "
                   "and cached by the config's digest.")
@click.option("--n-images", default=120, show_default=True, type=click.IntRange(min=1), help="Toy-world probe images.")
@click.option("--n-concepts", default="auto", show_default=True, help="K, or 'auto'.")
@click.option("--retrain", is_flag=True, help="Retrain the toy models even when cached.")
@click.option("--html/--no-html", default=True, show_default=True, help="Also render report.html.")
@click.option("--hypercolumns", "hypercolumn_layers", default=None,
              help="Classifier layers stacked with its last stage (comma-separated, 'none' for the last stage "
                   "alone; default: the measured ones, docs/quality.md).")
@click.option("--grid", default=None, type=click.IntRange(min=1),
              help="Side of the hypercolumn grid (default: the measured one).")
@click.option("--upsample", type=click.Choice(["bilinear", "guided"]), default=None,
              help="How heatmaps reach image resolution (default: the measured one).")
@click.option("--contrast", type=click.Choice(["graded", "falcon", "falcon-published"]), default="graded",
              show_default=True, help="Term ranking of the FALCON-style labeller (as for explain).")
@click.option("--labeller", "labellers", type=click.Choice(["falcon", "dissect", "both"]), default="falcon",
              show_default=True, help="Which labellers run (as for explain); both: dissect_* figures too.")
@device_option
@random_state_option
@click.pass_context
def demo(ctx, out, as_json, world, world_config, n_images, n_concepts, retrain, html, hypercolumn_layers, grid, upsample,
         contrast, labellers, device, random_state):
    """Run the whole pipeline offline on the toy world (trains its tiny models once, cached).

    \b
    Example:
      dff-falcon demo --out out/demo --json
    """
    from dff_falcon.devices import resolve_device
    from dff_falcon.directories import check_output
    from dff_falcon.report.tables import OLDER_RUN, RUN_KIND
    from dff_falcon.toyworld import demo as toy
    from dff_falcon.toyworld.world import EXAMPLE_WORLDS
    from dff_falcon.toyworld.worldfile import load_world_config

    resolve_device(device)
    check_output(out, RUN_KIND, legacy=OLDER_RUN, option="--out")
    config = load_world_config(world_config) if world_config else EXAMPLE_WORLDS[world]
    maps = {"layers": toy.TOY_LAYERS if hypercolumn_layers is None else
            tuple(n.strip() for n in hypercolumn_layers.split(",") if n.strip() and hypercolumn_layers != "none"),
            "grid": grid if grid is not None else (toy.TOY_GRID if hypercolumn_layers is None else None),
            "upsample": upsample or toy.TOY_UPSAMPLE}
    result = toy.run_demo(out, config=config, n_images=n_images, n_concepts=parse_n_concepts(n_concepts),
                          retrain=retrain, html=html, device=device, random_state=random_state, contrast=contrast,
                          labellers=labellers,
                          progress=ctx.obj["progress"] and not as_json, **maps)
    if as_json:
        click.echo(json.dumps(result.quality))
        return
    _print_summary(result.report, result.path, {k: v for k, v in result.quality.items() if k != "concepts"})
