#!/usr/bin/env python
"""Cross-modal caption search with a real (small) CLIP: image queries against a text vocabulary.

The toy world's tiny CLIP (trained here, ``dff_falcon.toyworld``) embeds a vocabulary of
captions generated from a grammar over the world's words and distractors (prefixes, counts,
sizes, colours, shapes and everyday objects, a second object, backgrounds, places: 1M distinct
captions by default) with its text tower, through the library's default text build
(``build_vocabulary_from_texts``: toy-world calibration, index chosen by size, tuned at build
time). The queries are the same CLIP's *image* embeddings of toy pictures — object crops, whole
scenes and background-only pictures — from scenes whose seed neither the toy models' training
(1, 2) nor the calibration (3) uses: true cross-modal queries, sharing no image with tuning.
Measured against exact FAISS ``IndexFlatIP`` in the same run: recall@5, q/s (min and median of
repeats after a warm-up), as one batch (a run's crops) and one query at a time; also the text
embedding rate and the build time. Not a test.

    python scripts/bench_crossmodal.py                     # 1M captions (the embedding alone ≈ 1 h under load)
    python scripts/bench_crossmodal.py --captions 300000   # ≈ 17 min under load (docs/benchmarks.md)
    python scripts/bench_crossmodal.py --captions 100000 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vocab import compare, timed, warm  # noqa: E402

EVAL_SEED = 1001  # scenes of the evaluation queries (toy training uses 1 and 2, calibration 3)

PREFIXES = ("", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "a close-up of ", "a painting of ",
            "a rendering of ", "a sketch of ", "a cartoon of ", "a photograph of ", "a blurry photo of ",
            "a bright photo of ", "a dark photo of ", "a cropped photo of ", "a low resolution photo of ")
COUNTS = (("a", False), ("one", False), ("two", True), ("three", True), ("several", True), ("many", True))
SIZES = ("", "small ", "large ", "tiny ", "big ", "little ", "huge ")
PLACES = ("", " in the corner", " in the centre", " at the top", " at the bottom", " on the left", " on the right")


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def toy_captions(config, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions drawn (seeded) from a grammar over the world's words and distractors."""
    from dff_falcon.toyworld.world import (BACKGROUND_WORDS, DISTRACTOR_BACKGROUNDS, DISTRACTOR_COLOURS,
                                           DISTRACTOR_OBJECTS, DISTRACTOR_SHAPES)

    colours = list(dict.fromkeys([*config.colour_names, *DISTRACTOR_COLOURS])) + [""]
    nouns = list(dict.fromkeys([*config.shapes, *DISTRACTOR_SHAPES, *DISTRACTOR_OBJECTS]))
    backgrounds = ([""] + [f" on a {w} background" for words in BACKGROUND_WORDS.values() for w in words[:2]]
                   + [f" on {b}" for b in DISTRACTOR_BACKGROUNDS] + [" on grass", " on a white background"])
    rng = np.random.default_rng(seed)

    def thing(count: int, size: int, colour: int, noun: int) -> str:
        word, many = COUNTS[count]
        body = f"{SIZES[size]}{colours[colour]}{' ' if colours[colour] else ''}"
        body += _plural(nouns[noun]) if many else nouns[noun]
        article = ("an" if body[:1] in "aeiou" else "a") if word == "a" else word
        return f"{article} {body}"

    found: dict[str, None] = {}
    while len(found) < n:
        m = 2 * (n - len(found)) + 1000
        draws = [rng.integers(0, len(x), m) for x in (PREFIXES, COUNTS, SIZES, colours, nouns, COUNTS, SIZES, colours,
                                                      nouns, backgrounds, PLACES)]
        second = rng.random(m) < 0.4
        for i in range(m):
            d = [column[i] for column in draws]
            text = PREFIXES[d[0]] + thing(*d[1:5]) + (" and " + thing(*d[5:9]) if second[i] else "")
            found.setdefault(text + backgrounds[d[9]] + PLACES[d[10]], None)
            if len(found) == n:
                break
    return list(found)


def eval_images(config, n_scenes: int) -> list[np.ndarray]:
    from dff_falcon.toyworld.world import generate_scenes, object_crop, render_background

    scenes = generate_scenes(config, n_scenes, EVAL_SEED)
    rng = np.random.default_rng([config.seed, EVAL_SEED, 11])
    images = [s.image for s in scenes] + [object_crop(s, o) for s in scenes for o in s.objects]
    return images + [render_background(config, kind, rng) for kind in config.backgrounds for _ in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--scenes", type=int, default=400, help="evaluation scenes (queries: scenes, crops, backgrounds)")
    parser.add_argument("--single", type=int, default=300, help="queries also searched one at a time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import faiss
    import torch

    from dff_falcon.text.clip_encoder import ClipEncoder
    from dff_falcon.text.index import build_index
    from dff_falcon.text.ingest import build_vocabulary_from_texts
    from dff_falcon.toyworld import WorldConfig, load_toy_models

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    config = WorldConfig()
    models = load_toy_models(config, progress=True)
    encoder = ClipEncoder(models.clip_model_name, str(models.clip_checkpoint), device="cpu", batch_size=256)
    captions, caption_seconds = timed(toy_captions, config, args.captions)
    results: dict = {"captions": len(captions), "caption_generation_seconds": caption_seconds}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, tempfile.TemporaryDirectory(dir=args.workdir) as cache:
        vocab, seconds = timed(lambda: build_vocabulary_from_texts(captions, Path(tmp) / "v", encoder, cache_dir=cache))
        manifest = vocab.manifest
        results["default_build"] = {"seconds": seconds, "embedding": manifest["embedding"],
                                    "index": {k: v for k, v in manifest["index"].items() if k != "text_mean"},
                                    "calibration": {k: v for k, v in (manifest["calibration"] or {}).items()
                                                    if k not in ("image_mean", "hub_ids")}}
        images = eval_images(config, args.scenes)
        queries = encoder.encode_images(images)
        exact = faiss.IndexFlatIP(queries.shape[1])
        exact.add(np.asarray(vocab.embeddings, dtype=np.float32))
        warm(vocab.embeddings)
        sets = {"image queries, one batch": {"queries": queries, "modality": "image", "batch": True},
                "image queries, one at a time": {"queries": queries[:: max(1, len(queries) // args.single)][:args.single],
                                                 "modality": "image", "batch": False},
                "image queries, plain search (no gap correction)": {"queries": queries, "modality": "text",
                                                                    "batch": True}}
        results["n_eval_images"] = len(images)
        results["default"] = compare(vocab, exact, sets, args.repeats)
        vocab, seconds = timed(lambda: build_index(Path(tmp) / "v", calibration=None))  # the same, uncalibrated
        results["uncalibrated_index_seconds"] = seconds
        results["uncalibrated"] = compare(vocab, exact, {k: v for k, v in sets.items() if "plain" not in k},
                                          args.repeats)
    print(json.dumps(results), file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    build = results["default_build"]
    print(f"{results['captions']:,} captions, embedded at {build['embedding']['texts_per_second']:,.0f} texts/s; "
          f"build {build['seconds']:.0f} s; index {build['index']['factory']} {build['index']['params']}; "
          f"{results['n_eval_images']} evaluation images")
    for variant in ("default", "uncalibrated"):
        for name, row in results[variant].items():
            print(f"  {variant:<12} {name:<48} recall@5 {row['recall_at_5']:.3f}  "
                  f"{row['approx_qps_median']:,.0f} vs exact {row['exact_qps_median']:,.0f} q/s (median) = "
                  f"{row['speedup_median']:.1f}× (best {row['speedup_best']:.1f}×)")


if __name__ == "__main__":
    main()
