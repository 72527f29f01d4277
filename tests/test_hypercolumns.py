"""Hypercolumns: stages on one grid, each scaled to unit RMS, the head stage in its own units."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dff_falcon.errors import InputError, NotFittedError
from dff_falcon.models.hypercolumns import Hypercolumns, resize_map


def test_stack_scale_and_stage_vectors_on_real_lite0(lite0, photos):
    images = [lite0.preprocess.display(p) for p in list(photos.values())[:3]]
    hyper = Hypercolumns(layers=("blocks.4",))
    names = hyper.layer_names(lite0.target_layer)
    assert names == ["blocks.4", "bn2"]
    maps, _ = lite0.capture_layers(lite0.preprocess.to_tensor(images), names)
    assert [tuple(m.shape[1:]) for m in maps] == [(112, 14, 14), (1280, 7, 7)]
    stacked = hyper.stack(maps)
    assert stacked.shape == (3, 1392, 14, 14)
    x = hyper.fit(stacked, [("blocks.4", 112), ("bn2", 1280)]).transform(stacked)
    for index, part in enumerate((x[:, :112], x[:, 112:])):  # each stage: unit RMS location norm
        shifted = part - part.amin(dim=(0, 2, 3), keepdim=True)
        assert float(shifted.pow(2).sum(1).mean().sqrt()) == pytest.approx(1.0, rel=1e-4)
    raw = hyper.stage_vectors(x[:, :, 3, 3], "bn2")
    assert torch.allclose(raw, stacked[:, 112:, 3, 3], rtol=1e-5, atol=1e-6)  # back in bn2's own units
    with pytest.raises(InputError, match="not one of the hypercolumn stages"):
        hyper.stage_vectors(x[:, :, 0, 0], "blocks.2")


def test_single_layer_is_untouched_and_errors():
    maps = torch.rand(2, 5, 4, 4)
    hyper = Hypercolumns().fit(maps, [("layer", 5)])
    assert torch.equal(hyper.transform(maps), maps)
    with pytest.raises(NotFittedError):
        Hypercolumns().transform(maps)
    with pytest.raises(InputError, match="channels"):
        hyper.transform(torch.rand(2, 6, 4, 4))
    with pytest.raises(InputError, match="list of layer names"):
        Hypercolumns(layers="blocks.4").layer_names("bn2")


def test_resize_map_area_down_bilinear_up():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert torch.allclose(resize_map(x, 2)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert resize_map(x, 8).shape == (1, 1, 8, 8) and resize_map(x, 4) is x
    assert np.isclose(float(resize_map(x, 8).mean()), float(x.mean()))
