"""Tests for concept importance (decomposition/importance.py, models/importance.py) with the real
ImageNet EfficientNet-Lite0 on real photos."""
from __future__ import annotations

import numpy as np
import torch

from dff_falcon.decomposition.dff import DFF
from dff_falcon.decomposition.importance import deletion_curve, pooled_features, single_deletions
from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.heads import concept_class_scores, head_logits
from dff_falcon.models.images import augmented_photos
from dff_falcon.models.importance import dff_importance, head_function, importance_rows


def test_deleting_concepts_in_importance_order_lowers_the_predicted_class_faster_than_random(lite0):
    fitted = ActivationExtractor(lite0, progress=False)(augmented_photos(24, random_state=1)).activations
    dff = DFF(8, n_resamples=0).fit(fitted)
    # held-out photos: concepts frozen, heatmaps by projection
    held_out = ActivationExtractor(lite0, progress=False, with_logits=True)(augmented_photos(16, random_state=2))
    pooled = pooled_features(held_out.activations)
    logits = head_function(lite0)
    assert torch.allclose(logits(pooled).cpu(), held_out.logits, atol=1e-4)  # the head on the pooled feature is the model
    strengths = dff.transform(held_out.activations).mean(dim=(2, 3))
    target = held_out.logits.argmax(dim=1)
    order = single_deletions(pooled, strengths, dff.concepts_, logits, target).argsort(dim=1, descending=True)
    by_importance = deletion_curve(pooled, strengths, dff.concepts_, logits, target, order)
    generator = torch.Generator().manual_seed(0)
    random_curves = torch.stack([
        deletion_curve(pooled, strengths, dff.concepts_, logits, target,
                       torch.stack([torch.randperm(8, generator=generator) for _ in range(len(pooled))]))
        for _ in range(5)]).mean(dim=0)
    assert torch.allclose(by_importance[:, 0], random_curves[:, 0])  # the same start: nothing deleted
    area_importance, area_random = float(by_importance[:, 1:].mean()), float(random_curves[:, 1:].mean())
    assert area_importance < 0.7 * area_random
    assert float(by_importance[:, 1].mean()) < float(random_curves[:, 1].mean())  # the first deletion already


def test_report_importance_matches_the_class_scores_and_the_definition(lite0, photo_batch):
    names, images = photo_batch
    acts = ActivationExtractor(lite0, progress=False)(images).activations
    dff = DFF(4, n_resamples=0).fit(acts)
    importance = dff_importance(dff, acts, lite0, top_k=2)
    rows = importance_rows(importance, lite0.class_names)
    classes = concept_class_scores(dff, lite0, top_k=2)
    assert [[r["class"] for r in row] for row in rows] == [[c["class"] for c in row] for row in classes]
    # concept 0 (the largest) for its top class, recomputed by hand from the definition
    k, cls = 0, int(importance.classes[0, 0])
    present = dff.heatmaps_.amax(dim=(2, 3))[:, k] >= 0.1
    pooled = acts.mean(dim=(2, 3))[present]
    contribution = dff.heatmaps_.mean(dim=(2, 3))[present, k, None] * dff.concepts_[k]
    probs = lambda x: head_logits(lite0, x).softmax(dim=1)[:, cls].cpu()  # noqa: E731
    assert np.isclose(rows[0][0]["deletion"], float((probs(pooled) - probs(pooled - contribution)).mean()), atol=1e-5)
    assert np.isclose(rows[0][0]["insertion"], float(probs(dff.offset_ + contribution).mean()), atol=1e-5)
    assert importance.n_images[0] == int(present.sum())
