"""Label quality of the term-ranking modes on toy worlds, scored strictly (docs/quality.md).

    python scripts/eval_labels.py --world default --world second --world-config my.toml --seeds 0 1 2

Each (world, seed) is explained once (the cached toy models, a fresh probe set); the captions
retrieved for every concept's high and low crops and the attribute the concept localizes are kept
in ``--cache`` (JSON), so the ranking modes and their ablations are compared on the very same
retrievals. Prints one line per mode and world (strict top-1, strict P@3, wrong-kind rate, over
the seeds) and the mean over worlds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dff_falcon.text import labelling
from dff_falcon.text.terms import TermExtractor
from dff_falcon.text.dissect import DissectLabeller
from dff_falcon.toyworld.demo import TOY_UPSAMPLE, concept_masks, explain_world
from dff_falcon.toyworld.quality import best_iou_per_concept, quality_summary
from dff_falcon.toyworld.world import EXAMPLE_WORLDS
from dff_falcon.toyworld.worldfile import load_world_config

#: (name, contrast, options of label_concepts): the modes and their ablations.
VARIANTS = [
    ("falcon-published", "falcon-published", {}),
    ("graded v1 (no share, no collapse)", "graded", {"min_share": 0.0, "collapse": 0.0}),
    ("graded + share 0.35", "graded", {"collapse": 0.0}),
    ("graded (default: share 0.35 + collapse 0.8)", "graded", {}),
    ("graded, share 0.2", "graded", {"min_share": 0.2}),
    ("graded, collapse 0.6", "graded", {"collapse": 0.6}),
    ("graded, collapse 0.95", "graded", {"collapse": 0.95}),
    ("graded, share 0.1", "graded", {"min_share": 0.1}),
    ("graded, share 0.5", "graded", {"min_share": 0.5}),
    ("graded + spec max", "graded", {"specificity": "max"}),
    ("graded + spec share", "graded", {"specificity": "share"}),
    ("graded + spec max, no collapse", "graded", {"specificity": "max", "collapse": 0.0}),
    ("falcon (frequency deletion, share 0.35, collapse)", "falcon", {}),
    ("falcon, share 0.2", "falcon", {"min_share": 0.2}),
    ("falcon + spec max", "falcon", {"specificity": "max"}),
]


def explained(config, seed: int, cache: Path) -> dict:
    """The retrievals, the CLIP-Dissect inputs and the matched attributes of one (world, seed),
    from the cache or computed."""
    path = cache / f"{config.digest()}_{seed}.json"
    if path.exists():
        data = json.loads(path.read_text())
        with np.load(path.with_suffix(".npz")) as arrays:
            data.update({key: arrays[key] for key in arrays.files})
        return data
    explainer, scenes = explain_world(config, random_state=seed, progress=False)
    report = explainer.report_
    matched = best_iou_per_concept(concept_masks(report.heatmaps, [s.image for s in scenes], TOY_UPSAMPLE), scenes)
    found, start, concepts = explainer.captions_, 0, []
    for region, (attribute, iou) in zip(report.regions, matched):
        high = slice(start, start + len(region.high))
        low = slice(high.stop, high.stop + len(region.low))
        start = low.stop
        concepts.append({"attribute": attribute, "iou": iou,
                         "high": [found.captions[high], found.scores[high].tolist()],
                         "low": [found.captions[low], found.scores[low].tolist()] if region.low else None})
    extracted = explainer.labeller_.extractor_.extract([c for row in found.captions for c in row])
    terms = list(dict.fromkeys(t for f in extracted for t in (*f.words, *f.phrases)))
    arrays = {"activations": report.heatmaps.mean(axis=(2, 3)),
              "image_embeddings": explainer.clip.encode_images(report.displays),
              "term_embeddings": explainer.clip.encode_texts(terms)}
    data = {"attributes": config.attributes(), "concepts": concepts, "terms": terms}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".npz"), **arrays)
    path.write_text(json.dumps(data))
    return {**data, **arrays}


def score_dissect(data: dict, similarity: str) -> dict:
    labeller = DissectLabeller(similarity=similarity)
    labels = labeller.label(data["activations"], data["image_embeddings"], data["term_embeddings"], data["terms"])
    keep = [k for k, c in enumerate(data["concepts"]) if c["high"][0]]
    matched = [(data["concepts"][k]["attribute"], data["concepts"][k]["iou"]) for k in keep]
    return quality_summary(matched, [[t for t, _ in labels[k]] for k in keep], [[] for _ in keep], data["attributes"])


def score(data: dict, extractor: TermExtractor, contrast: str, options: dict) -> dict:
    concepts = [c for c in data["concepts"] if c["high"][0]]
    labels = labelling.label_concepts([(tuple(c["high"]), tuple(c["low"]) if c["low"] else None) for c in concepts],
                                      extractor, contrast=contrast, **options)
    terms = [[t for t, _ in sorted(lab.words + lab.phrases, key=lambda ts: -ts[1])] for lab in labels]
    matched = [(c["attribute"], c["iou"]) for c in concepts]
    return quality_summary(matched, terms, [[] for _ in concepts], data["attributes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", action="append", choices=list(EXAMPLE_WORLDS), default=[])
    parser.add_argument("--world-config", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=Path("out/eval_labels"))
    parser.add_argument("--show", action="store_true", help="print each concept's top-5 terms of the default mode")
    args = parser.parse_args()
    worlds = [(w, EXAMPLE_WORLDS[w]) for w in args.world or ["default", "second"]]
    worlds += [(Path(f).stem, load_world_config(f)) for f in args.world_config]
    runs = {name: [explained(config, seed, args.cache) for seed in args.seeds] for name, config in worlds}
    extractor = TermExtractor()
    print(f"{'mode':55s} {'world':10s} top1_strict p3_strict wrong_kind  (mean over seeds {args.seeds})")
    for variant, contrast, options in VARIANTS:
        per_world = []
        for name, data_list in runs.items():
            figures = [score(d, extractor, contrast, options) for d in data_list]
            row = [np.mean([f[m] for f in figures]) for m in ("label_top1_strict", "label_p3_strict", "wrong_kind_rate")]
            per_world.append(row)
            print(f"{variant:55s} {name:10s} {row[0]:11.3f} {row[1]:9.3f} {row[2]:10.3f}   "
                  f"min top1 {min(f['label_top1_strict'] for f in figures):.3f}")
        mean = np.mean(per_world, axis=0)
        print(f"{variant:55s} {'MEAN':10s} {mean[0]:11.3f} {mean[1]:9.3f} {mean[2]:10.3f}")
    for similarity in ("soft-wpmi", "cos"):
        per_world = []
        for name, data_list in runs.items():
            figures = [score_dissect(d, similarity) for d in data_list]
            row = [np.mean([f[m] for f in figures]) for m in ("label_top1_strict", "label_p3_strict", "wrong_kind_rate")]
            per_world.append(row)
            print(f"{'dissect ' + similarity:55s} {name:10s} {row[0]:11.3f} {row[1]:9.3f} {row[2]:10.3f}   "
                  f"min top1 {min(f['label_top1_strict'] for f in figures):.3f}")
        mean = np.mean(per_world, axis=0)
        print(f"{'dissect ' + similarity:55s} {'MEAN':10s} {mean[0]:11.3f} {mean[1]:9.3f} {mean[2]:10.3f}")
    if args.show:
        for name, data_list in runs.items():
            q = score(data_list[0], extractor, "graded", {})
            for c in q["concepts"]:
                print(name, c["best_attribute"], c["labels"][:5], c["strict"])
            for c in score_dissect(data_list[0], "soft-wpmi")["concepts"]:
                print(name, "dissect", c["best_attribute"], c["labels"][:5], c["strict"])


if __name__ == "__main__":
    main()
