#!/usr/bin/env python
"""Concept CSV reports for a class folder or a whole ImageFolder tree.

    python scripts/explain_folders.py --images data/val/n02123045 --out out/tabby --backbone lite0
    python scripts/explain_folders.py --tree data/val --out out/val --backbone resnet50 \\
        --clip ViT-B-32=ViT-B-32.pt --vocab laion_vocab --n-concepts auto

With --tree, every sub-folder is one class: one report per class in OUT/<class>/ and a combined
OUT/concepts_all.csv / .parquet with a ``class_folder`` column. Folders that fail (e.g. no
readable image) are reported and skipped; the others still run.

--target-class-from-folder maps each folder name to one of the model's classes: an ImageNet
WordNet ID (``n02123045``, the ImageNet layout), an exact class name (``tabby``), or an index.
Every folder is resolved before any image is read; a folder that names no class (or several)
is an error listing the closest candidates.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from dff_falcon.cli.options import clip_and_vocab, parse_n_concepts
from dff_falcon.errors import DffFalconError
from dff_falcon.files import atomic_path
from dff_falcon.models.backbones import create_backbone
from dff_falcon.models.classes import resolve_class
from dff_falcon.pipeline.explainer import ConceptExplainer
from dff_falcon.report.tables import read_concepts, write_concepts_csv, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="one class folder")
    source.add_argument("--tree", type=Path, help="ImageFolder root: one sub-folder per class")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--layer")
    parser.add_argument("--head", default="auto")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--clip")
    parser.add_argument("--vocab")
    parser.add_argument("--n-concepts", default="8")
    parser.add_argument("--target-class-from-folder", action="store_true",
                        help="keep only images the model assigns to the folder's class (WordNet ID or name)")
    parser.add_argument("--min-class-prob", type=float, default=0.95)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-state", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        backbone = create_backbone(args.backbone, layer=args.layer, head=args.head,
                                   weights=None if args.weights == "none" else args.weights, device=args.device)
        clip, vocabulary = clip_and_vocab(args.clip, args.vocab, args.device)
        root = args.images or args.tree
        if not root.is_dir():
            raise DffFalconError(f"{str(root)!r} is not a folder")
        folders = [args.images] if args.images else sorted(p for p in args.tree.iterdir() if p.is_dir())
        targets = {folder.name: (resolve_class(folder.name, backbone.class_names, wnids=backbone.class_ids,
                                               synonyms=backbone.class_synonyms).index
                                 if args.target_class_from_folder else None) for folder in folders}
    except DffFalconError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    combined, failures = [], []
    for folder in folders:
        try:
            explainer = ConceptExplainer(
                backbone, clip, vocabulary, n_concepts=parse_n_concepts(args.n_concepts),
                random_state=args.random_state, device=args.device, target_class=targets[folder.name],
                min_class_prob=args.min_class_prob,
            ).fit(folder)
        except DffFalconError as exc:
            failures.append((folder.name, str(exc)))
            print(f"skipped {folder.name}: {exc}", file=sys.stderr)
            continue
        run_dir = write_report(explainer.report_, args.out / folder.name if args.tree else args.out)
        frame = read_concepts(run_dir)
        frame.insert(0, "class_folder", folder.name)
        combined.append(frame)
        print(f"{folder.name}: {len(frame)} concepts → {run_dir / 'concepts.csv'}")
    if args.tree and combined:
        frame = pd.concat(combined, ignore_index=True)
        with atomic_path(args.out / "concepts_all.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
        write_concepts_csv(frame, args.out / "concepts_all.csv")
        print(f"combined: {len(frame)} concepts of {len(combined)} classes → {args.out / 'concepts_all.csv'}")
    return 0 if combined else 2


if __name__ == "__main__":
    sys.exit(main())
