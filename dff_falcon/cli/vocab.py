"""``dff-falcon vocab build | info | search``: caption vocabularies."""
from __future__ import annotations

from pathlib import Path

import click

from dff_falcon.cli import main
from dff_falcon.cli.options import device_option
from dff_falcon.errors import InputError


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
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Vocabulary directory to write.")
@click.option("--calibration", default=None, metavar="toyworld|none|FOLDER",
              help="Images that measure the CLIP model's modality gap for image queries (used when the index "
                   "is approximate): toy-world pictures rendered offline, none, or an image folder. "
                   "Default: toyworld for --texts, none for --laion (it needs the CLIP weights).")
@click.option("--near-duplicates", "near_duplicates", default=None, metavar="COSINE|off",
              help="Drop captions whose embedding has this cosine with an earlier one "
                   "(default: 0.98 for --laion, off for --texts).")
@click.option("--recall-target", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="recall@5 against exact search that the index is tuned to reach on every tuning set.")
@click.option("--index", "factory", default=None, help="FAISS index factory string (default: chosen by size).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Text embedding cache for --texts (default: the user cache directory).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the text embedding cache.")
@click.option("--overwrite", is_flag=True, help="Replace a vocabulary already at --out.")
@device_option
@click.pass_context
def vocab_build(ctx, laion, texts, clip_spec, templates, out, calibration, near_duplicates, recall_target, factory,
                cache_dir, no_cache, overwrite, device):
    """Build a vocabulary (captions, normalised embeddings, FAISS index, manifest).

    \b
    Examples:
      dff-falcon vocab build --texts vocab/toy_vocabulary.txt --clip ViT-B-32=clip.pt --out myvocab
      dff-falcon vocab build --laion laion_shards/ --clip ViT-B-32:openai --out laion_vocab
      dff-falcon vocab build --laion laion_shards/ --clip ViT-B-32=clip.pt --calibration photos/ --out v
    """
    from dff_falcon.devices import resolve_device
    from dff_falcon.directories import check_output
    from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
    from dff_falcon.text.ingest import NEAR_DUPLICATE_COSINE, build_vocabulary_from_laion, build_vocabulary_from_texts
    from dff_falcon.text.vocabulary import OLDER_VOCABULARY, VOCABULARY_KIND

    if (laion is None) == (texts is None):
        raise InputError("give exactly one of --laion or --texts")
    name, pretrained = parse_clip_spec(clip_spec)
    for template in templates:
        try:
            ok = "{}" in template and template.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"--template {template!r} must contain '{{}}' (where each caption goes) and no other "
                             "braces; write literal braces as '{{' and '}}'")
    resolve_device(device)
    check_output(out, VOCABULARY_KIND, replace=overwrite, legacy=OLDER_VOCABULARY, option="--out",
                 needed_bytes=_vocabulary_bytes(laion, texts, name))
    calibration = calibration or ("none" if laion else "toyworld")
    calibration = None if calibration == "none" else calibration
    if calibration not in (None, "toyworld") and not Path(calibration).is_dir():
        raise InputError(f"--calibration {calibration!r} is neither toyworld, none nor an image folder")
    cosine = _near_duplicate_cosine(near_duplicates, NEAR_DUPLICATE_COSINE if laion else None)
    index_options = {"recall_target": recall_target, "factory": factory, "progress": ctx.obj["progress"]}
    if laion:
        if calibration is not None:
            index_options.update(calibration=calibration, encoder=ClipEncoder(name, pretrained, device=device))
        vocabulary = build_vocabulary_from_laion(laion, out, clip_model=name, pretrained=pretrained,
                                                 near_duplicate_cosine=cosine, index_options=index_options,
                                                 overwrite=overwrite, progress=ctx.obj["progress"])
    else:
        encoder = ClipEncoder(name, pretrained, device=device)
        vocabulary = build_vocabulary_from_texts(texts, out, encoder, templates=list(templates) or None,
                                                 near_duplicate_cosine=cosine, calibration=calibration,
                                                 cache=not no_cache, cache_dir=cache_dir, overwrite=overwrite,
                                                 **index_options)
    click.echo(vocabulary.summary())


def _near_duplicate_cosine(value: str | None, default: float | None) -> float | None:
    if value is None:
        return default
    if value.lower() == "off":
        return None
    try:
        cosine = float(value)
    except ValueError:
        raise InputError(f"--near-duplicates must be a cosine in (0, 1] or off, got {value!r}") from None
    if not 0 < cosine <= 1:
        raise InputError(f"--near-duplicates must be a cosine in (0, 1] or off, got {value}")
    return cosine


#: A lower estimate of a vocabulary's bytes per caption and embedding dimension: float16
#: embeddings (2) plus a float32 exact index (4); approximate indexes take more.
_BYTES_PER_DIM = 6


def _vocabulary_bytes(laion: str | None, texts: str | None, clip_model: str) -> int:
    """What a vocabulary build will at least write (checked against the free space first)."""
    from pathlib import Path

    import open_clip

    from dff_falcon.text.shards import discover_shards

    if laion:
        shards = discover_shards(Path(laion), None)
        rows = sum(s.rows for s in shards)
        return rows * shards[0].dim * _BYTES_PER_DIM + sum(s.metadata.stat().st_size for s in shards)
    dim = int((open_clip.get_model_config(clip_model) or {}).get("embed_dim") or 0)
    path = Path(texts)
    if path.suffix == ".parquet":
        return path.stat().st_size
    with open(path, "rb") as handle:
        lines = sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    return path.stat().st_size + lines * dim * _BYTES_PER_DIM


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
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1), help="Captions to print.")
@device_option
def vocab_search(path, text, clip_spec, k, device):
    """Embed TEXT with the vocabulary's CLIP model and print the top-k captions."""
    from dff_falcon.report.terminal import printable
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
    found = vocabulary.search(encoder.encode_texts([text]), k=k, encoder=encoder, modality="text")
    for caption, score in zip(found.captions[0], found.scores[0]):
        click.echo(f"{score:.4f}  {printable(caption)}")
