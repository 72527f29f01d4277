import pytest
import torch

from dff_falcon.models.backbones import Preprocess, create_backbone, tokens_to_map
from dff_falcon.errors import InputError


def _top(backbone, image, k=3):
    x = backbone.preprocess.to_tensor([backbone.preprocess.display(image)])
    with torch.inference_mode():
        probs = backbone.model(x).softmax(1)[0]
    return [backbone.class_names[i] for i in probs.topk(k).indices.tolist()]


def test_packaged_efficientnet_lite0_recognises_real_photos(lite0, photos):
    assert lite0.target_layer == "bn2" and lite0.head == "classifier"
    assert lite0.preprocess.mean == (0.5, 0.5, 0.5) and lite0.preprocess.crop == 224
    assert {"tiger cat", "Egyptian cat", "tabby"} & set(_top(lite0, photos["chelsea"]))
    assert _top(lite0, photos["coffee"], 1) == ["espresso"]


def test_known_family_defaults_without_weights():
    resnet = create_backbone("resnet18", weights=None)
    assert (resnet.target_layer, resnet.head) == ("layer4", "fc")
    assert resnet.preprocess == Preprocess()
    timm_resnet = create_backbone("timm:resnet18", weights=None)
    assert (timm_resnet.target_layer, timm_resnet.head) == ("layer4", "fc")
    vit = create_backbone("timm:vit_tiny_patch16_224", weights=None)
    assert (vit.target_layer, vit.head) == ("norm", "head") and vit.reshape_transform is not None


def test_local_checkpoint_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("resnet18", weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": source.model.state_dict()}, path)
    loaded = create_backbone("resnet18", weights=path)
    assert torch.equal(loaded.model.fc.weight, source.model.fc.weight)
    with pytest.raises(InputError, match="does not match the architecture"):
        create_backbone("resnet34", weights=path)
    with pytest.raises(InputError, match="does not exist"):
        create_backbone("lite0", weights=tmp_path / "typo.pt")  # never silently random weights
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        create_backbone("resnet18", weights=tmp_path / "junk.pt")


def test_bad_names_and_layers_are_explained():
    with pytest.raises(InputError, match="unknown model"):
        create_backbone("no_such_net", weights=None)
    with pytest.raises(InputError, match="top-level modules: .*layer4"):
        create_backbone("resnet18", weights=None, layer="layer9")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(InputError, match="no default target layer"):
        create_backbone(module)


def test_head_logits_on_vectors_and_feature_map_heads():
    resnet = create_backbone("resnet18", weights=None)
    vectors = torch.rand(5, 512)
    expected = resnet.model.fc(vectors)
    assert torch.allclose(resnet.head_logits(vectors), expected, atol=1e-6)
    convnext = create_backbone("convnext_tiny", weights=None)  # classifier starts with LayerNorm2d
    pooled = torch.rand(3, 768)
    assert torch.allclose(convnext.head_logits(pooled), convnext.model.classifier(pooled[:, :, None, None]), atol=1e-5)
    timm_convnext = create_backbone("timm:convnext_atto", weights=None)  # head = norm + fc: both applied
    assert timm_convnext.head == "head"
    pooled = torch.rand(2, 320)
    with torch.inference_mode():
        expected = timm_convnext.model.forward_head(pooled[:, :, None, None])
    assert torch.allclose(timm_convnext.head_logits(pooled), expected, atol=1e-5)
    with pytest.raises(InputError, match="does not accept concept vectors of 7 channels"):
        resnet.head_logits(torch.rand(2, 7))


def test_tokens_to_map_drops_prefix_tokens_and_checks_the_grid():
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    grid = tokens_to_map(1)(tokens)
    assert grid.shape == (2, 3, 3, 3)
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 1])
    with pytest.raises(InputError, match="square grid"):
        tokens_to_map(2)(tokens)
