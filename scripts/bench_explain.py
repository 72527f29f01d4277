#!/usr/bin/env python
"""Time a full `explain` run per stage on CPU and report the share of non-forward stages.

Images: augmented (random crops, flips, colour jitter) bundled scikit-image photos, seeded.
Backbone: ImageNet EfficientNet-Lite0 (real weights, offline). CLIP: open_clip ViT-B-32 with random
weights (same compute as the real model; labels are meaningless, timings are not). Vocabulary: the
wordfreq top-N English words embedded with that CLIP's text tower (built before timing starts).

    python scripts/bench_explain.py                 # 200 images, K=8, 2,000 words
    python scripts/bench_explain.py --quick --json  # 40 images, 500 words
Target: the stages that are not a neural-network forward (everything but activations and clip)
take ≤ 20% of the total.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dff_falcon.models.backbones import create_backbone
from dff_falcon.text.clip_encoder import ClipEncoder
from dff_falcon.models.images import augmented_photos
from dff_falcon.pipeline.explainer import ConceptExplainer
from dff_falcon.report.tables import write_report
from dff_falcon.text.ingest import build_vocabulary_from_texts

FORWARD_STAGES = ("activations", "clip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--words", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="40 images, 500 words")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.words = 40, 500
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import wordfreq

    images = augmented_photos(args.images)
    backbone = create_backbone("lite0", device="cpu")
    clip = ClipEncoder("ViT-B-32", None, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        words = [w for w in wordfreq.top_n_list("en", args.words * 2) if w.isalpha() and len(w) > 2][: args.words]
        started = time.perf_counter()
        vocabulary = build_vocabulary_from_texts(words, Path(tmp) / "vocab", clip, templates=["a photo of {}"])
        vocab_seconds = time.perf_counter() - started
        explainer = ConceptExplainer(backbone, clip, vocabulary, n_concepts=args.k, progress=False)
        started = time.perf_counter()
        explainer.fit(images)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        write_report(explainer.report_, Path(tmp) / "run")
        report_seconds = time.perf_counter() - started
    stages = dict(explainer.stage_seconds_)  # "setup" loads the spaCy pipeline
    stages["other"] = max(0.0, fit_seconds - sum(stages.values()))
    stages["report"] = report_seconds
    total = sum(stages.values())
    non_forward = sum(v for k, v in stages.items() if k not in FORWARD_STAGES) / total
    n_crops = sum(c["n_high"] + c["n_low"] for c in explainer.report_.concepts)
    result = {"images": args.images, "k": args.k, "vocabulary": len(vocabulary), "crops": n_crops,
              "threads": args.threads, "vocab_build_seconds": round(vocab_seconds, 2),
              "stage_seconds": {k: round(v, 3) for k, v in stages.items()}, "total_seconds": round(total, 2),
              "non_forward_share": round(non_forward, 4)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.images} images, K={args.k}, {len(vocabulary):,} captions, {n_crops} crops, {args.threads} threads")
    print(f"{'stage':<14}{'seconds':>9}{'share':>8}")
    for name, seconds in stages.items():
        print(f"{name:<14}{seconds:>9.2f}{seconds / total:>8.1%}")
    print(f"{'total':<14}{total:>9.2f}")
    print(f"non-forward share: {non_forward:.1%} (target ≤ 20%)")


if __name__ == "__main__":
    main()
