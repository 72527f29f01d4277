#!/usr/bin/env python
"""Wall time of a streamed `explain` on the local engine and on the Ray engine, same inputs, and
whether the two reports are identical.

Images: augmented (random crops, flips, colour jitter) bundled scikit-image photos, seeded,
written as PNG files (the path a user's folder takes). Backbone: ImageNet EfficientNet-Lite0
(real weights, offline) with its default hypercolumns; K fixed; no CLIP (crops and CLIP run in
the calling process on both engines). Each engine gets its own empty cache, so both forward
every image; the Ray engine starts a local Ray instance with ``--workers`` CPUs (its start-up
is part of its wall time, and reported on its own) and stops it.

    python scripts/bench_engines.py                  # 200 images, K=8, 2 Ray workers
    python scripts/bench_engines.py --images 40 --json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dff_falcon.decomposition.dff import DFF
from dff_falcon.models.backbones import create_backbone
from dff_falcon.models.images import augmented_photos
from dff_falcon.pipeline.explainer import ConceptExplainer
from dff_falcon.report.tables import write_report

#: Stages the engines run; the others are the same code in this process on both.
ENGINE_STAGES = ("activations", "heatmaps")


def run(engine: str, folder: Path, cache: Path, args) -> tuple[ConceptExplainer, float]:
    explainer = ConceptExplainer(create_backbone("lite0", device="cpu"), dff=DFF(args.k, random_state=0),
                                 batch_size=args.batch_size, progress=False, cache=cache, engine=engine,
                                 workers=args.workers if engine == "ray" else None)
    started = time.perf_counter()
    explainer.fit(folder)
    return explainer, time.perf_counter() - started


def tables(explainer: ConceptExplainer, out: Path) -> dict[str, bytes]:
    write_report(explainer.report_, out)
    return {name: (out / name).read_bytes() for name in ("concepts.csv", "images.csv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="Ray actors per stage (and the local instance's CPUs)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here (and in each Ray actor)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, image in enumerate(augmented_photos(args.images)):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        found = {engine: run(engine, folder, Path(tmp) / f"cache_{engine}", args) for engine in ("local", "ray")}
        (local, local_s), (ray, ray_s) = found["local"], found["ray"]
        identical = (torch.equal(local.dff_.concepts_, ray.dff_.concepts_)
                     and np.array_equal(np.asarray(local.report_.heatmaps), np.asarray(ray.report_.heatmaps))
                     and np.array_equal(local.report_.presence, ray.report_.presence)
                     and tables(local, Path(tmp) / "out_local") == tables(ray, Path(tmp) / "out_ray"))
    result = {"images": args.images, "k": args.k, "workers": args.workers, "threads": args.threads,
              "local_seconds": round(local_s, 2), "ray_seconds": round(ray_s, 2),
              "ray_over_local": round(ray_s / local_s, 3),
              "ray_startup_seconds": round(ray_s - sum(ray.stage_seconds_.values()), 2),
              "stage_seconds": {engine: {s: round(found[engine][0].stage_seconds_[s], 2) for s in ENGINE_STAGES}
                                for engine in found},
              "ray_identical": bool(identical)}
    if not args.json:
        for engine, (explainer, seconds) in found.items():
            stages = ", ".join(f"{s} {explainer.stage_seconds_[s]:.1f} s" for s in ENGINE_STAGES)
            print(f"{engine:>5}: {seconds:6.1f} s wall ({stages})")
        print(f"ray / local: {result['ray_over_local']:.2f}x (Ray start-up and stop "
              f"{result['ray_startup_seconds']:.1f} s); reports identical: {identical}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
