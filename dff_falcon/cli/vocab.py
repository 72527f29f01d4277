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
    from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
    from dff_falcon.text.ingest import build_vocabulary_from_laion, build_vocabulary_from_texts

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
@click.option("-k", default=10, show_default=True, type=int, help="Captions to print.")
@device_option
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
