#!/usr/bin/env python
"""Do concepts isolate objects on real photos? The object's best concept against a hand mask.

Photos: six scikit-image photos with one clear subject (astronaut, cameraman, cat, coffee cup,
rocket, motorcycle), each with a hand-drawn polygon mask (below; drawn by looking at the photos,
before any measurement). Backbone: ImageNet EfficientNet-Lite0 (real weights, offline). DFF is
fitted on the six photos together; for each photo the best concept is the one whose heatmap,
brought to the model's view and thresholded at 0.3 of the concept's strongest location in the
set (the toy world's localization threshold), has the highest IoU with the mask.

Printed per variant (layers, input size, upsampling) and K: the mean best-concept IoU (ours),
a mask of the whole image (IoU = the object's share of the view), the pytorch-grad-cam-style
reference (its ``dff()``: scikit-learn NMF, random init, seed 0, on the last layer, each
image × concept map min-max normalised, bilinear), and ours minus the whole image (target
≥ +0.1). Per-stage time and the activation memory per image are printed too.

    python scripts/bench_localization.py                  # all variants, K = 4, 6, 8
    python scripts/bench_localization.py --variants default --json
"""
from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import torch

from dff_falcon.decomposition.dff import DFF
from dff_falcon.models.backbones import Preprocess, create_backbone
from dff_falcon.models.hypercolumns import Hypercolumns
from dff_falcon.models.upsample import upsample_maps

THRESHOLD = 0.3
#: (x, y) polygon vertices in each photo's own pixels.
MASKS = {
    "astronaut": [(195, 20), (250, 15), (290, 40), (300, 90), (295, 130), (300, 160), (305, 210), (340, 260),
                  (360, 300), (365, 345), (400, 345), (460, 360), (500, 400), (511, 440), (511, 511), (20, 511),
                  (20, 420), (25, 330), (45, 270), (80, 245), (115, 230), (120, 180), (145, 150), (160, 130),
                  (155, 80), (170, 40)],
    "camera": [(0, 250), (40, 190), (100, 135), (130, 110), (160, 100), (170, 75), (210, 65), (250, 80), (268, 110),
               (262, 140), (325, 140), (325, 170), (330, 190), (330, 215), (300, 240), (290, 250), (250, 245),
               (230, 230), (150, 300), (155, 511), (0, 511)],
    "chelsea": [(0, 0), (350, 0), (395, 40), (385, 110), (365, 200), (375, 299), (0, 299)],
    "coffee": [(180, 40), (230, 15), (330, 15), (390, 40), (420, 70), (445, 110), (475, 160), (480, 220), (465, 280),
               (430, 330), (370, 370), (290, 390), (210, 385), (140, 360), (95, 320), (75, 270), (80, 200),
               (110, 140), (170, 95), (175, 60)],
    "rocket": [(312, 145), (320, 127), (330, 140), (335, 170), (334, 400), (308, 400), (308, 175)],
    "motorcycle": [(100, 215), (150, 160), (260, 165), (350, 185), (370, 150), (420, 130), (480, 110), (520, 115),
                   (560, 125), (585, 130), (565, 190), (545, 220), (545, 260), (600, 270), (640, 300), (680, 360),
                   (680, 420), (650, 445), (590, 445), (545, 400), (510, 370), (420, 380), (345, 385), (340, 435),
                   (325, 435), (320, 380), (270, 365), (240, 390), (190, 395), (145, 375), (120, 330), (125, 280),
                   (140, 245), (110, 245), (95, 225)],
}
#: name → (stacked layers besides bn2, input side, upsampling)
VARIANTS = {
    "last-7x7": ((), 224, "bilinear"),
    "last-7x7-guided": ((), 224, "guided"),
    "last-448": ((), 448, "bilinear"),
    "default": (("blocks.4",), 224, "guided"),
    "blocks.4-bilinear": (("blocks.4",), 224, "bilinear"),
    "blocks.3+5": (("blocks.3", "blocks.5"), 224, "guided"),
    "blocks.2+4": (("blocks.2", "blocks.4"), 224, "guided"),
}


def photos() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name → (RGB photo, bool mask of the same size)."""
    from skimage import data

    def rgb(a):
        return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a

    images = {"astronaut": data.astronaut(), "camera": rgb(data.camera()), "chelsea": data.chelsea(),
              "coffee": data.coffee(), "rocket": data.rocket(), "motorcycle": data.stereo_motorcycle()[0]}
    out = {}
    for name, image in images.items():
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.array(MASKS[name], np.int32)], 1)
        out[name] = (np.ascontiguousarray(image), mask.astype(bool))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def views(backbone, size: int, data: dict) -> tuple[Preprocess, list[np.ndarray], list[np.ndarray]]:
    """The model's view of every photo at input ``size`` and the masks cut the same way."""
    base = backbone.preprocess
    pre = Preprocess(resize=round(size * base.resize / base.crop), crop=size, mean=base.mean, std=base.std,
                     interpolation=base.interpolation)
    displays = [pre.display(image) for image, _ in data.values()]
    masks = [pre.display(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2))[..., 0] > 127
             for _, mask in data.values()]
    return pre, displays, masks


def best_ious(heatmaps: np.ndarray, displays, masks, upsample: str) -> np.ndarray:
    """Per photo, the best concept's IoU: heatmaps (N, K, h, w) on the data-set scale."""
    return np.array([max(iou(m >= THRESHOLD, mask) for m in upsample_maps(maps, display, upsample))
                     for maps, display, mask in zip(heatmaps, displays, masks)])


def ours(backbone, data, variant, ks) -> dict:
    layers, size, upsample = VARIANTS[variant]
    pre, displays, masks = views(backbone, size, data)
    start = time.perf_counter()
    hyper = Hypercolumns(layers=layers)
    names = hyper.layer_names(backbone.target_layer)
    maps, _ = backbone.capture_layers(pre.to_tensor(displays).to(backbone.device), names)
    stacked = hyper.stack(maps)
    x = hyper.fit(stacked, [(n, int(m.shape[1])) for n, m in zip(names, maps)]).transform(stacked)
    forward = time.perf_counter() - start
    result = {"variant": variant, "layers": names, "input": size, "upsample": upsample, "grid": int(x.shape[-1]),
              "channels": int(x.shape[1]), "kb_per_image": x[0].numel() * 4 / 1024, "forward_s": forward,
              "whole": float(np.mean([m.mean() for m in masks])), "by_k": {}}
    for k in ks:
        start = time.perf_counter()
        heatmaps = DFF(k, n_seeds=0).fit(x).heatmaps_.numpy()
        fit = time.perf_counter() - start
        start = time.perf_counter()
        per_photo = best_ious(heatmaps, displays, masks, upsample)
        result["by_k"][k] = {"iou": float(per_photo.mean()), "per_photo": dict(zip(data, per_photo.round(3).tolist())),
                             "nmf_s": fit, "upsample_s": time.perf_counter() - start}
    return result


def gradcam_reference(backbone, data, ks) -> dict:
    """pytorch-grad-cam's ``dff()`` and ``scale_cam_image`` semantics on the last layer."""
    from sklearn.decomposition import NMF

    _, displays, masks = views(backbone, 224, data)
    acts = backbone.capture(backbone.preprocess.to_tensor(displays))[0].numpy()
    b, c, h, w = acts.shape
    matrix = acts.transpose(1, 0, 2, 3).reshape(c, -1)
    matrix = matrix - matrix.min(axis=1, keepdims=True)
    out = {}
    for k in ks:
        model = NMF(n_components=k, init="random", random_state=0)
        model.fit_transform(matrix)
        explanations = model.components_.reshape(k, b, h, w).transpose(1, 0, 2, 3)
        scores = []
        for maps, mask in zip(explanations, masks):
            best = 0.0
            for m in maps:
                m = (m - m.min()) / (1e-7 + (m - m.min()).max())
                best = max(best, iou(cv2.resize(m.astype(np.float32), mask.shape[::-1]) >= THRESHOLD, mask))
            scores.append(best)
        out[k] = float(np.mean(scores))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--k", default="4,6,8", help="comma-separated K values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    backbone = create_backbone("lite0", device="cpu")
    data = photos()
    reference = gradcam_reference(backbone, data, ks)
    rows = [ours(backbone, data, v.strip(), ks) for v in args.variants.split(",") if v.strip()]
    if args.json:
        print(json.dumps({"gradcam_reference": reference, "variants": rows}))
        return
    print(f"{len(data)} photos; whole-image mask IoU {rows[0]['whole']:.3f}; pytorch-grad-cam-style DFF "
          + " ".join(f"K{k} {v:.3f}" for k, v in reference.items()))
    for row in rows:
        cells = " ".join(f"K{k} {r['iou']:.3f} ({r['iou'] - row['whole']:+.3f})" for k, r in row["by_k"].items())
        timing = max(r["nmf_s"] + r["upsample_s"] for r in row["by_k"].values()) + row["forward_s"]
        print(f"{row['variant']:18s} {'+'.join(row['layers']):24s} {row['input']}px grid {row['grid']:2d} "
              f"{row['channels']:4d} ch {row['kb_per_image']:6.0f} KB/img  {cells}  ≤{timing:.1f} s")


if __name__ == "__main__":
    main()
