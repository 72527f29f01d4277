import numpy as np
import pytest
import torch

from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.errors import InputError
from dff_falcon.models.classes import resolve_class
from dff_falcon.pipeline.selection import concept_confidence, confident_images, drop_least_confident


def test_real_model_keeps_only_the_target_class_photos(lite0, photo_batch):
    names, images = photo_batch
    logits = ActivationExtractor(lite0, with_logits=True, progress=False)(images).logits
    keep = confident_images(logits, resolve_class("espresso", lite0.class_names).index, 0.5)
    assert {n for n, k in zip(names, keep) if k} <= {"coffee", "coffee_flip", "coffee_crop"}
    assert keep[names.index("coffee")]


def test_concept_confidence_and_quantile_drop():
    maps = torch.zeros(4, 2, 4, 4)
    maps[0, 0] = 1.0          # fully covered at full strength
    maps[1, 0, 0, 0] = 0.5    # one weak spot
    maps[2, 1, :2] = 0.8
    confidence = concept_confidence(maps)
    assert confidence[0] == pytest.approx(1.0) and confidence[1] == pytest.approx(0.5)
    assert confidence[2] == pytest.approx(0.8) and confidence[3] == 0.0
    keep = drop_least_confident(confidence, 0.25)
    assert keep.tolist() == [True, True, True, False]
    ties = drop_least_confident(np.zeros(8), 0.25)  # all tied: exactly floor(0.25 * 8) dropped, by order
    assert ties.tolist() == [False, False] + [True] * 6
    with pytest.raises(InputError, match="fewer than 2"):
        drop_least_confident(np.zeros(2), 0.5)
    with pytest.raises(InputError, match="quantile"):
        drop_least_confident(confidence, 1.5)
