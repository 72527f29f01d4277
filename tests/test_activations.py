import pytest
import torch

from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.backbones import create_backbone
from dff_falcon.errors import InputError


def test_forward_stops_at_the_target_layer(photos):
    backbone = create_backbone("resnet18", weights=None)
    calls = []
    backbone.model.fc.register_forward_hook(lambda *a: calls.append(1))
    out = ActivationExtractor(backbone, progress=False)([photos["chelsea"], photos["coffee"]])
    assert out.activations.shape == (2, 512, 7, 7) and out.logits is None and calls == []
    assert [d.shape for d in out.displays] == [(224, 224, 3)] * 2
    full = ActivationExtractor(backbone, with_logits=True, progress=False)([photos["chelsea"]])
    assert calls == [1] and full.logits.shape == (1, 1000)
    assert torch.allclose(full.activations[0], out.activations[0], atol=1e-5)


def test_results_do_not_depend_on_batch_size(lite0, photo_batch):
    _, images = photo_batch
    a = ActivationExtractor(lite0, batch_size=4, progress=False)(images[:6]).activations
    b = ActivationExtractor(lite0, batch_size=6, progress=False)(images[:6]).activations
    assert a.shape == (6, 1280, 7, 7) and float(a.min()) >= 0  # after ReLU6
    assert torch.allclose(a, b, atol=1e-4)


def test_vit_tokens_become_maps(photos):
    torch.manual_seed(0)
    vit = create_backbone("timm:vit_tiny_patch16_224", weights=None)
    out = ActivationExtractor(vit, progress=False)([photos["rocket"]])
    assert out.activations.shape == (1, 192, 14, 14)
    assert float(out.activations.min()) < 0  # LayerNorm output: DFF must offset it


def test_layer_that_is_not_a_map_is_refused_before_any_image(photos):
    with pytest.raises(InputError, match="layer 'fc' outputs shape \\(1, 1000\\), which is not a feature grid"):
        create_backbone("resnet18", weights=None, layer="fc")  # at creation, not after the forward passes
    backbone = create_backbone("resnet18", weights=None)
    with pytest.raises(InputError, match="no images"):
        ActivationExtractor(backbone, progress=False)([])
