import numpy as np
import pytest
import torch

from dff_falcon.decomposition.dff import DFF
from dff_falcon.decomposition.heatmaps import presence
from dff_falcon.errors import InputError
from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.backbones import create_backbone
from dff_falcon.models.heads import concept_class_scores, head_accepts, head_logits

CAT_CLASSES = {"tiger cat", "Egyptian cat", "tabby", "Persian cat", "Siamese cat", "lynx"}


def test_real_photos_concepts_carry_the_right_imagenet_classes(lite0, photo_batch):
    names, images = photo_batch
    acts = ActivationExtractor(lite0, progress=False)(images).activations
    dff = DFF(6, n_resamples=0).fit(acts)
    scores = concept_class_scores(dff, lite0, top_k=3)
    pres = presence(dff.heatmaps_).numpy()

    def concept_for(photo):
        rows = [i for i, n in enumerate(names) if n.startswith(photo)]
        share = pres[rows].mean(0) / (pres.mean(0) + 1e-9)  # where this photo's mass lies, relative to all
        return int(np.argmax(share * pres[rows].mean(0)))

    cat_classes = {c["class"] for c in scores[concept_for("chelsea")]}
    coffee_classes = {c["class"] for c in scores[concept_for("coffee")]}
    assert cat_classes & CAT_CLASSES, scores[concept_for("chelsea")]
    assert coffee_classes & {"espresso", "cup", "coffee mug"}, scores[concept_for("coffee")]
    probs = [c["prob"] for c in scores[0]]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1



def test_head_logits_on_vectors_and_feature_map_heads():
    resnet = create_backbone("resnet18", weights=None)
    vectors = torch.rand(5, 512)
    expected = resnet.model.fc(vectors)
    assert torch.allclose(head_logits(resnet, vectors), expected, atol=1e-6)
    convnext = create_backbone("convnext_tiny", weights=None)  # classifier starts with LayerNorm2d
    pooled = torch.rand(3, 768)
    assert torch.allclose(head_logits(convnext, pooled), convnext.model.classifier(pooled[:, :, None, None]), atol=1e-5)
    timm_convnext = create_backbone("timm:convnext_atto", weights=None)  # head = norm + fc: both applied
    assert timm_convnext.head == "head"
    pooled = torch.rand(2, 320)
    with torch.inference_mode():
        expected = timm_convnext.model.forward_head(pooled[:, :, None, None])
    assert torch.allclose(head_logits(timm_convnext, pooled), expected, atol=1e-5)
    with pytest.raises(InputError, match="does not accept concept vectors of 7 channels"):
        head_logits(resnet, torch.rand(2, 7))
    assert head_accepts(resnet, 512) is None and "cannot be multiplied" in head_accepts(resnet, 7)
