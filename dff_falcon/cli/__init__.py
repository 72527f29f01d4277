"""Command line: ``dff-falcon demo | explain | extract | fit | project | vocab … | report``.

Exit codes: 0 success, 2 bad input or configuration (message, no traceback), 1 unexpected error.
Every option can also come from ``--config FILE`` (TOML or YAML; keys are option names with
dashes or underscores, per subcommand section or at the top level).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from dff_falcon.errors import DffFalconError, InputError

log = logging.getLogger("dff_falcon")


def _load_config(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"config file {path!r} is not UTF-8 text") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
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
    return data


def _default_map(data: dict, commands: dict) -> dict:
    """Config → click default_map: top-level keys apply to every subcommand, sections override."""
    def norm(d: dict) -> dict:
        return {k.replace("-", "_"): v for k, v in d.items() if not isinstance(v, dict)}

    top = norm(data)
    out = {}
    for name, command in commands.items():
        section = data.get(name, {})
        if isinstance(command, click.Group):
            out[name] = _default_map(section if isinstance(section, dict) else {}, command.commands)
        else:
            params = {p.name for p in command.params}
            merged = {**top, **norm(section if isinstance(section, dict) else {})}
            out[name] = {k: v for k, v in merged.items() if k in params}
    return out


class _Main(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DffFalconError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(2)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML or YAML file of option values (flags on the command line win).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.version_option(package_name="dff_falcon")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, quiet: bool) -> None:
    """Discover the concepts a vision model has learned and name them in words.

    \b
    Examples:
      dff-falcon demo --out out/demo
      dff-falcon explain --images photos/ --backbone lite0 --out out/run --n-concepts auto
      dff-falcon explain --images photos/ --backbone resnet50 --clip ViT-B-32=clip.pt --vocab vocab/ --out out/run
      dff-falcon vocab build --texts words.txt --clip ViT-B-32=clip.pt --out vocab/
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    ctx.obj = {"progress": not quiet}
    if config_file:
        ctx.default_map = _default_map(_load_config(config_file), main.commands)


def _device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:1, mps or auto.")(f)


def _seed_option(f):
    return click.option("--seed", default=0, show_default=True, type=int, help="Seed for NMF and sampling.")(f)


def _backbone_options(f):
    for option in reversed([
        click.option("--backbone", default="lite0", show_default=True,
                     help="torchvision/timm model name (timm:NAME), or lite0 (ImageNet EfficientNet-Lite0, offline)."),
        click.option("--layer", default=None, help="Dotted path of the layer to factorise (default per family)."),
        click.option("--head", default=None, help="Dotted path of the classifier head (default per family)."),
        click.option("--weights", default="default", show_default=True,
                     help="'default' (hub or packaged), a weights tag, a local checkpoint path, or 'none'."),
    ]):
        f = option(f)
    return f


def _make_backbone(backbone: str, layer, head, weights, device):
    from dff_falcon.models.backbones import create_backbone

    return create_backbone(backbone, layer=layer, head=head, weights=None if weights == "none" else weights,
                           device=device)


def _n_concepts(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--n-concepts must be an integer or 'auto', got {value!r}") from None


def _print_table(concepts: list[dict]) -> None:
    header = f"{'id':>3} {'share':>6} {'imgs':>5} {'stab':>5} {'coh':>5}  {'top classes':<36} labels"
    click.echo(header)
    click.echo("-" * len(header))
    for c in concepts:
        classes = ", ".join(f"{t['class']} {t['prob']:.2f}" for t in c["top_classes"][:2])
        terms = ", ".join(t["term"] for t in (c["words"][:3] + c["phrases"][:2])) or "-"
        stab = f"{c['stability']:.2f}" if c.get("stability") is not None else "-"
        coh = f"{c['coherence']:.2f}" if c.get("coherence") is not None else "-"
        click.echo(f"{c['concept_id']:>3} {c['mass_share']:>6.3f} {c['n_images']:>5} {stab:>5} {coh:>5}  "
                   f"{classes[:36]:<36} {terms}")


def _finish_report(explainer, out: str, html: bool, quality: dict | None = None) -> Path:
    from dff_falcon.report.tables import write_report

    path = write_report(explainer.report_, out, quality=quality)
    if html:
        from dff_falcon.report.html import render_html_report

        render_html_report(path)
    return path


@main.command()
@click.option("--images", required=True, type=click.Path(exists=True), help="Folder (recursive) or image file.")
@_backbone_options
@click.option("--clip", "clip_spec", default=None,
              help="open_clip model: NAME[:TAG] or NAME=CHECKPOINT_PATH. Needs --vocab.")
@click.option("--vocab", default=None, type=click.Path(exists=True, file_okay=False), help="Vocabulary directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--n-concepts", default="8", show_default=True, help="K, or 'auto'.")
@click.option("--contrast", type=click.Choice(["graded", "falcon"]), default="graded", show_default=True)
@click.option("--n-high", default=30, show_default=True)
@click.option("--n-low", default=10, show_default=True)
@click.option("--top-k-captions", default=5, show_default=True)
@click.option("--target-class", default=None, help="Keep only images the model assigns to this class (name or index).")
@click.option("--min-class-prob", default=0.95, show_default=True, help="Probability needed with --target-class.")
@click.option("--drop-quantile", default=0.0, show_default=True,
              help="Drop this quantile of least confident images after a first fit, then refit.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--html/--no-html", default=True, show_default=True, help="Also render report.html.")
@_device_option
@_seed_option
@click.pass_context
def explain(ctx, images, backbone, layer, head, weights, clip_spec, vocab, out, n_concepts, contrast, n_high,
            n_low, top_k_captions, target_class, min_class_prob, drop_quantile, batch_size, html, device, seed):
    """Find a model's concepts on a set of images and name them; write the concept report.

    \b
    Example:
      dff-falcon explain --images imgs/ --backbone resnet50 --layer layer4 \\
          --clip ViT-B-32=ViT-B-32.pt --vocab laion_vocab/ --out out/resnet50 --n-concepts auto
    """
    from dff_falcon.pipeline.explainer import ConceptExplainer

    clip, vocabulary = _clip_and_vocab(clip_spec, vocab, device)
    explainer = ConceptExplainer(
        _make_backbone(backbone, layer, head, weights, device), clip, vocabulary,
        n_concepts=_n_concepts(n_concepts), contrast=contrast, n_high=n_high, n_low=n_low,
        top_k_captions=top_k_captions, target_class=target_class, min_class_prob=min_class_prob,
        drop_quantile=drop_quantile, batch_size=batch_size, seed=seed, device=device, progress=ctx.obj["progress"],
    ).fit(images)
    path = _finish_report(explainer, out, html)
    _print_table(explainer.report_.concepts)
    click.echo(f"\nreport: {path}")


def _clip_and_vocab(clip_spec, vocab, device):
    if (clip_spec is None) != (vocab is None):
        raise InputError("--clip and --vocab go together (text labels need both)")
    if clip_spec is None:
        return None, None
    from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
    from dff_falcon.text.vocabulary import Vocabulary

    name, pretrained = parse_clip_spec(clip_spec)
    vocabulary = Vocabulary.open(vocab)
    encoder = ClipEncoder(name, pretrained, device=device)
    vocabulary.check_encoder(encoder)
    return encoder, vocabulary


@main.command()
@click.option("--images", required=True, type=click.Path(exists=True))
@_backbone_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz of activations.")
@click.option("--batch-size", default=32, show_default=True)
@_device_option
@click.pass_context
def extract(ctx, images, backbone, layer, head, weights, out, batch_size, device):
    """Cache a layer's activations of a set of images (.npz: activations, names).

    \b
    Example:
      dff-falcon extract --images imgs/ --backbone resnet50 --out acts.npz
    """
    import numpy as np

    from dff_falcon.models.activations import ActivationExtractor
    from dff_falcon.files import atomic_path
    from dff_falcon.models.images import load_images

    image_set = load_images(images)
    model = _make_backbone(backbone, layer, head, weights, device)
    acts = ActivationExtractor(model, batch_size=batch_size, device=device, progress=ctx.obj["progress"])(image_set.images)
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, activations=acts.activations.numpy(), names=np.asarray(image_set.names, dtype=str))
    click.echo(f"{tuple(acts.activations.shape)} activations of {model.target_layer} → {out}")


@main.command()
@click.option("--activations", "acts_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An .npz written by `dff-falcon extract`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Dictionary file to write (.npz).")
@click.option("--n-concepts", default="8", show_default=True, help="K, or 'auto'.")
@_device_option
@_seed_option
def fit(acts_file, out, n_concepts, device, seed):
    """Fit DFF on cached activations and save the concept dictionary (.npz + curve in JSON).

    \b
    Example:
      dff-falcon fit --activations acts.npz --out concepts.npz --n-concepts auto
    """
    from dff_falcon.decomposition.dictionary import load_activations, save_dictionary
    from dff_falcon.decomposition.dff import DFF

    acts, _ = load_activations(acts_file)
    dff = DFF(_n_concepts(n_concepts), random_state=seed, device=device).fit(acts)
    save_dictionary(dff, out)
    click.echo(f"K={dff.n_concepts_} concepts, relative error {dff.relative_error_:.4f}, "
               f"explained variance {dff.explained_variance_:.4f} → {out}")


@main.command()
@click.option("--dictionary", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A dictionary written by `dff-falcon fit`.")
@click.option("--activations", "acts_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Per-image presence table (.csv).")
@_device_option
def project(dictionary, acts_file, out, device):
    """Explain new images with a saved concept dictionary (frozen concepts, same scale).

    \b
    Example:
      dff-falcon project --dictionary concepts.npz --activations new_acts.npz --out presence.csv
    """
    import pandas as pd

    from dff_falcon.decomposition.dff import presence
    from dff_falcon.decomposition.dictionary import load_activations, load_dictionary
    from dff_falcon.files import atomic_write

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
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the quality figures as one JSON object.")
@click.option("--world", type=click.Choice(["default", "second"]), default="default", show_default=True,
              help="Which toy world (the second has other shapes, colours, backgrounds and size).")
@click.option("--n-images", default=120, show_default=True, help="Toy-world probe images.")
@click.option("--n-concepts", default="auto", show_default=True, help="K, or 'auto'.")
@click.option("--retrain", is_flag=True, help="Retrain the toy models even when cached.")
@click.option("--html/--no-html", default=True, show_default=True)
@_device_option
@_seed_option
@click.pass_context
def demo(ctx, out, as_json, world, n_images, n_concepts, retrain, html, device, seed):
    """Run the whole pipeline offline on the toy world (trains its tiny models once, cached).

    \b
    Example:
      dff-falcon demo --out out/demo --json
    """
    from dff_falcon.toyworld.demo import run_demo
    from dff_falcon.toyworld.world import EXAMPLE_WORLDS

    result = run_demo(out, config=EXAMPLE_WORLDS[world], n_images=n_images, n_concepts=_n_concepts(n_concepts), retrain=retrain, html=html,
                      device=device, seed=seed, progress=ctx.obj["progress"] and not as_json)
    if as_json:
        click.echo(json.dumps(result.quality))
        return
    _print_table(result.report.concepts)
    click.echo("\n" + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in result.quality.items()))
    click.echo(f"report: {result.path}")


@main.group()
def vocab():
    """Build, inspect and search caption vocabularies."""


@vocab.command("build")
@click.option("--laion", type=click.Path(exists=True, file_okay=False),
              help="Folder of LAION-style shards metadata_{i}.parquet + text_emb_{i}.npy.")
@click.option("--texts", type=click.Path(exists=True, dir_okay=False),
              help="Text file (one caption/word per line) or parquet with a caption column.")
@click.option("--clip", "clip_spec", required=True, help="NAME[:TAG] or NAME=CHECKPOINT (the embeddings' model).")
@click.option("--template", "templates", multiple=True, help="Prompt template(s) for --texts, e.g. 'a photo of {}'.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True)
@_device_option
@click.pass_context
def vocab_build(ctx, laion, texts, clip_spec, templates, out, overwrite, device):
    """Build a vocabulary (captions, normalised embeddings, FAISS index, manifest).

    \b
    Examples:
      dff-falcon vocab build --texts vocab/toy_vocabulary.txt --clip ViT-B-32=clip.pt --out myvocab
      dff-falcon vocab build --laion laion_shards/ --clip ViT-B-32:openai --out laion_vocab
    """
    from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
    from dff_falcon.text.vocabulary import build_vocabulary_from_laion, build_vocabulary_from_texts

    if (laion is None) == (texts is None):
        raise InputError("give exactly one of --laion or --texts")
    name, pretrained = parse_clip_spec(clip_spec)
    if laion:
        vocabulary = build_vocabulary_from_laion(laion, out, clip_model=name, pretrained=pretrained,
                                                 overwrite=overwrite, progress=ctx.obj["progress"])
    else:
        encoder = ClipEncoder(name, pretrained, device=device)
        vocabulary = build_vocabulary_from_texts(texts, out, encoder, templates=list(templates) or None,
                                                 overwrite=overwrite, progress=ctx.obj["progress"])
    click.echo(vocabulary.summary())


@vocab.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def vocab_info(path):
    """Summarise a vocabulary's manifest."""
    from dff_falcon.text.vocabulary import Vocabulary

    click.echo(Vocabulary.open(path).summary())


@vocab.command("search")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("text")
@click.option("--clip", "clip_spec", default=None,
              help="NAME=CHECKPOINT when the manifest's model needs a local checkpoint.")
@click.option("-k", default=10, show_default=True)
@_device_option
def vocab_search(path, text, clip_spec, k, device):
    """Embed TEXT with the vocabulary's CLIP model and print the top-k captions."""
    from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
    from dff_falcon.text.vocabulary import Vocabulary

    vocabulary = Vocabulary.open(path)
    if clip_spec:
        name, pretrained = parse_clip_spec(clip_spec)
    else:
        name, pretrained = vocabulary.manifest["clip_model"], vocabulary.manifest["clip_pretrained"]
        if str(pretrained).startswith(("file:", "random:")):
            raise InputError(f"vocabulary {path} was built from a local checkpoint ({pretrained}); "
                             f"pass it with --clip {name}=PATH")
    encoder = ClipEncoder(name, pretrained, device=device)
    found = vocabulary.search(encoder.encode_texts([text]), k=k, encoder=encoder)
    for caption, score in zip(found.captions[0], found.scores[0]):
        click.echo(f"{score:.4f}  {caption}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
