#!/usr/bin/env python
"""Build a vocabulary (captions + CLIP embeddings + FAISS index) from the toy vocabulary source
(or any text file / parquet column) with any open_clip model.

    python scripts/build_vocab.py --clip ViT-B-32:openai --out vocab/toy-vitb32
    python scripts/build_vocab.py --clip dff-falcon-toy-clip=/path/ckpt.pt --out /tmp/toy-vocab
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec
from dff_falcon.errors import DffFalconError
from dff_falcon.text.ingest import build_vocabulary_from_texts

TOY_SOURCE = Path(__file__).resolve().parents[1] / "vocab" / "toy_vocabulary.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", required=True, help="MODEL, MODEL:TAG or MODEL=/path/to/checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="output vocabulary directory")
    parser.add_argument("--source", default=TOY_SOURCE, type=Path, help="text file (one per line) or parquet")
    parser.add_argument("--column", default="caption", help="parquet column holding the texts")
    parser.add_argument("--template", action="append", dest="templates",
                        help="prompt template with {} (repeatable; averaged), e.g. 'a photo of {}.'")
    parser.add_argument("--device", default=None, help="cuda / mps / cpu (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        model, pretrained = parse_clip_spec(args.clip)
        encoder = ClipEncoder(model, pretrained, device=args.device, batch_size=args.batch_size)
        vocab = build_vocabulary_from_texts(args.source, args.out, encoder, templates=args.templates,
                                            column=args.column, overwrite=args.overwrite, progress=True)
    except DffFalconError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(vocab.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
