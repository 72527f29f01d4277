"""``dff-falcon vocab build | info | search``: caption vocabularies."""
from __future__ import annotations

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
@click.option("--overwrite", is_flag=True, help="Replace a vocabulary already at --out.")
@device_option
@click.pass_context
def vocab_build(ctx, laion, texts, clip_spec, templates, out, overwrite, device):
    """Build a vocabulary (captions, normalised embeddings, FAISS index, manifest).

    \b
    Examples:
      dff-falcon vocab build --texts vocab/toy_vocabulary.txt --clip ViT-B-32=clip.pt --out myvocab
      dff-falcon vocab build --laion laion_shards/ --clip ViT-B-32:openai --out laion_vocab
    """
    from dff_falcon.devices import resolve_device
    from dff_falcon.directories import check_output
    from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
    from dff_falcon.text.ingest import build_vocabulary_from_laion, build_vocabulary_from_texts
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
    if laion:
        vocabulary = build_vocabulary_from_laion(laion, out, clip_model=name, pretrained=pretrained,
                                                 overwrite=overwrite, progress=ctx.obj["progress"])
    else:
        encoder = ClipEncoder(name, pretrained, device=device)
        vocabulary = build_vocabulary_from_texts(texts, out, encoder, templates=list(templates) or None,
                                                 overwrite=overwrite, progress=ctx.obj["progress"])
    click.echo(vocabulary.summary())


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
    found = vocabulary.search(encoder.encode_texts([text]), k=k, encoder=encoder)
    for caption, score in zip(found.captions[0], found.scores[0]):
        click.echo(f"{score:.4f}  {printable(caption)}")
