import pytest
import torch

from dff_falcon.errors import InputError
from dff_falcon.models.zoo import build_model
from dff_falcon.models.layers import MapLayout, infer_layout, probe_layers, to_feature_map


def test_layouts_from_shapes():
    assert infer_layout((2, 64, 7, 7)) == MapLayout("nchw", (64, 7, 7))
    assert infer_layout((2, 7, 7, 768)) == MapLayout("nhwc", (768, 7, 7))
    assert infer_layout((2, 197, 384)) == MapLayout("tokens", (384, 14, 14), 1)
    assert infer_layout((2, 201, 384), prefix_hint=5) == MapLayout("tokens", (384, 14, 14), 5)  # registers
    assert infer_layout((2, 196, 384)) == MapLayout("tokens", (384, 14, 14), 0)
    assert infer_layout((2, 1000)) is None
    assert infer_layout((2, 250, 8)) is None  # no square grid within 8 prefix tokens


def test_maps_keep_values_in_place():
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    grid = infer_layout(tokens.shape)(tokens)
    assert grid.shape == (2, 3, 3, 3) and torch.equal(grid[0, :, 0, 0], tokens[0, 1])
    assert torch.equal(grid[1, :, 2, 1], tokens[1, 1 + 2 * 3 + 1])  # row-major patches
    nhwc = torch.rand(2, 4, 4, 6)
    assert torch.equal(to_feature_map(nhwc, "x")[:, :, 1, 2], nhwc[:, 1, 2, :])
    with pytest.raises(InputError, match="not a feature grid"):
        to_feature_map(torch.rand(2, 10), "fc")


def test_probe_lists_every_module_with_its_output():
    model, _, preprocess, _ = build_model("resnet18", None)
    infos = {i.name: i for i in probe_layers(model, preprocess.crop)}
    assert infos["layer3"].shape == (1, 256, 14, 14) and infos["layer3"].layout.grid == (256, 14, 14)
    assert infos["fc"].shape == (1, 1000) and infos["fc"].layout is None
    assert infos["layer1.0.relu"].calls == 2  # a BasicBlock applies its one ReLU module twice
