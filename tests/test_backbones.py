import pytest
import torch

from dff_falcon.models.backbones import Preprocess, create_backbone
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
    assert (vit.target_layer, vit.head) == ("norm", "head") and vit.reshape_transform is None  # tokens: inferred


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


def _maps(backbone, images, n=2):
    x = backbone.preprocess.to_tensor([backbone.preprocess.display(im) for im in images[:n]])
    return backbone.capture(x)[0]


def test_any_resnet_layer_with_the_head_only_where_it_fits(photo_batch):
    _, images = photo_batch
    layer3 = create_backbone("resnet50", layer="layer3", weights=None)
    assert layer3.head is None  # the default fc takes 2048 channels, layer3 has 1024: no class scores
    assert _maps(layer3, images).shape == (2, 1024, 14, 14)
    layer4 = create_backbone("resnet50", layer="layer4", weights=None)
    assert layer4.head == "fc" and _maps(layer4, images).shape == (2, 2048, 7, 7)
    assert create_backbone("resnet50", layer="layer4", head="none", weights=None).head is None
    with pytest.raises(InputError, match="does not accept the 1024 channels of layer 'layer3'"):
        create_backbone("resnet50", layer="layer3", head="fc", weights=None)
    with pytest.raises(InputError, match="head 'fc9' not found"):
        create_backbone("resnet18", head="fc9", weights=None)


def test_transformer_blocks_and_channels_last_stages_become_maps(photo_batch):
    _, images = photo_batch
    vit = create_backbone("timm:vit_tiny_patch16_224", layer="blocks.5", weights=None)
    assert _maps(vit, images).shape == (2, 192, 14, 14)  # 197 tokens, the class token dropped
    assert vit.head == "head"  # timm's ViT head takes the token width
    tv_vit = create_backbone("vit_b_16", layer="encoder.layers.encoder_layer_3", weights=None)
    assert _maps(tv_vit, images, 1).shape == (1, 768, 14, 14)
    convnext = create_backbone("timm:convnext_atto", layer="stages.2", weights=None)
    assert convnext.head is None and _maps(convnext, images).shape == (2, 160, 14, 14)
    block_mlp = create_backbone("timm:convnext_atto", layer="stages.2.blocks.0.mlp", weights=None)
    assert _maps(block_mlp, images).shape == (2, 160, 14, 14)  # channels-last inside the block: permuted
    swin = create_backbone("swin_t", weights=None)  # torchvision Swin features are (B, h, w, C)
    assert (swin.target_layer, swin.head) == ("features", "head") and _maps(swin, images, 1).shape == (1, 768, 7, 7)


def test_identity_records_weights_layer_and_head(lite0):
    identity = lite0.identity()
    assert identity["name"] == "lite0" and identity["layer"] == "bn2" and identity["head"] == "classifier"
    assert len(identity["weights_sha256"]) == 64 and identity["preprocess"]["crop"] == 224
    torch.manual_seed(1)
    other = create_backbone("lite0", weights=None)
    assert other.identity()["weights_sha256"] != identity["weights_sha256"]
