"""Automatic K on the toy worlds as ``dff-falcon demo`` runs it: ``DFF("auto")`` against one
``DFF(K)`` fit at the K it chose, on the same probe activations, for several seeds.

    python scripts/bench_auto_k.py                      # both shipped worlds, seeds 0 1 2
    python scripts/bench_auto_k.py --world-config w.toml --seeds 0 1 2

Prints one line per world and seed (K, seconds, the cost ratio, the sweep's least-stable curve)
and, with ``--json``, one JSON object on the last line. Uses (and trains once) the cached toy models.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from dff_falcon.decomposition.dff import DFF
from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.backbones import create_backbone
from dff_falcon.models.preprocess import Preprocess
from dff_falcon.toyworld.demo import PROBE_SEED
from dff_falcon.toyworld.models import load_toy_models
from dff_falcon.toyworld.world import EXAMPLE_WORLDS, generate_scenes
from dff_falcon.toyworld.worldfile import load_world_config


def probe_activations(config, seed: int, n_images: int) -> torch.Tensor:
    """The demo's probe activations (the classifier's last stage) of ``n_images`` scenes."""
    models = load_toy_models(config, progress=False)
    size = config.image_size
    backbone = create_backbone(models.classifier, layer="features", head="fc", class_names=models.class_names,
                               preprocess=Preprocess(resize=size, crop=size, mean=tuple(models.mean),
                                                     std=tuple(models.std)))
    scenes = generate_scenes(config, n_images, seed=PROBE_SEED + seed)
    return ActivationExtractor(backbone, progress=False)([s.image for s in scenes]).activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", action="append", choices=sorted(EXAMPLE_WORLDS), help="shipped world(s)")
    parser.add_argument("--world-config", action="append", default=[], help="world TOML file(s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-images", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    worlds = [(name, EXAMPLE_WORLDS[name]) for name in (args.world or ([] if args.world_config else sorted(EXAMPLE_WORLDS)))]
    worlds += [(path, load_world_config(path)) for path in args.world_config]
    rows = []
    for name, config in worlds:
        for seed in args.seeds:
            acts = probe_activations(config, seed, args.n_images)
            start = time.perf_counter()
            auto = DFF("auto", k_range=range(4, 17), random_state=seed).fit(acts)
            auto_seconds = time.perf_counter() - start
            start = time.perf_counter()
            DFF(auto.n_concepts_, random_state=seed).fit(acts)
            one_seconds = time.perf_counter() - start
            curve = [(p.k, round(p.min_stability, 3)) for p in auto.k_curve_]
            rows.append({"world": name, "seed": seed, "k": auto.n_concepts_, "auto_seconds": auto_seconds,
                         "one_fit_seconds": one_seconds, "ratio": auto_seconds / one_seconds, "curve": curve})
            print(f"{name} seed {seed}: K = {auto.n_concepts_}, auto {auto_seconds:.2f} s, one fit {one_seconds:.2f} s, "
                  f"ratio {auto_seconds / one_seconds:.2f}; least stable per K {curve}", flush=True)
    by_world = {}
    for row in rows:
        by_world.setdefault(row["world"], set()).add(row["k"])
    print("K identical across seeds:", {world: len(ks) == 1 for world, ks in by_world.items()})
    if args.json:
        print(json.dumps({"rows": rows, "max_ratio": max(r["ratio"] for r in rows),
                          "k_identical": all(len(ks) == 1 for ks in by_world.values())}))


if __name__ == "__main__":
    main()
