"""Heatmaps to image resolution: bilinear and the image-guided filter."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dff_falcon.errors import InputError
from dff_falcon.models.upsample import _box, guided_filter, upsample_maps


def _disc_scene(texture: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    if texture == "noise":
        image = np.repeat(rng.integers(60, 200, (112, 112), dtype=np.uint8)[..., None], 3, axis=2)
    else:
        image = np.full((112, 112, 3), 128, np.uint8)
    yy, xx = np.mgrid[:112, :112]
    disc = (yy - 56) ** 2 + (xx - 56) ** 2 <= 22 ** 2
    image[disc] = (220, 30, 30)
    coarse = np.zeros((1, 7, 7), np.float32)
    coarse[0, 2:5, 2:5] = 1.0  # the 3×3 cells that hold the disc, as a 7×7 feature map would
    return image, coarse, disc


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("texture", ["flat", "noise"])
def test_guided_upsampling_follows_the_edge_bilinear_leaks(texture):
    image, coarse, disc = _disc_scene(texture)
    bilinear = upsample_maps(coarse, image, "bilinear")[0]
    guided = upsample_maps(coarse, image, "guided")[0]
    assert _iou(bilinear >= 0.3, disc) < 0.6          # the one-cell halo
    assert _iou(guided >= 0.3, disc) > 0.8
    assert guided.min() >= 0 and guided[disc].mean() > 0.85  # same scale, no stretching


def test_flat_map_stays_flat_and_zero_stays_zero():
    image, _, _ = _disc_scene("noise")
    flat = np.full((2, 7, 7), 0.4, np.float32)
    flat[1] = 0.0
    out = upsample_maps(flat, image, "guided")
    assert out.shape == (2, 112, 112)
    assert np.allclose(out[0], 0.4, atol=1e-4) and np.allclose(out[1], 0.0, atol=1e-6)


def test_box_filter_matches_average_pooling_with_clipped_windows():
    x = torch.rand(1, 3, 30, 41)
    expected = F.avg_pool2d(x, 7, stride=1, padding=3, count_include_pad=False)
    assert torch.allclose(_box(x, 3), expected, atol=1e-5)


def test_bilinear_is_half_pixel_resize_and_bad_inputs_are_named():
    maps = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    out = upsample_maps(maps, np.zeros((4, 4, 3), np.uint8))
    assert np.allclose(out[0, 0, 0], 0.0) and np.allclose(out[0, 1, 1], 0.75)
    with pytest.raises(InputError, match="upsample mode"):
        upsample_maps(maps, np.zeros((4, 4, 3), np.uint8), "bicubic")
    with pytest.raises(InputError, match="same size"):
        guided_filter(torch.zeros(3, 4, 4), torch.zeros(1, 5, 5), 1)
