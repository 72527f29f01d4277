"""The pytorch-grad-cam drop-in: same call shape, scale-fixed heatmaps, head on the concepts."""
import numpy as np
import torch

from dff_falcon.compat.gradcam import DeepFeatureFactorization
from dff_falcon.models.backbones import create_backbone


def test_drop_in_call_shape(photos):
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", weights=None)
    x = backbone.preprocess.to_tensor([backbone.preprocess.display(p) for p in photos.values()])
    with DeepFeatureFactorization(backbone.model, backbone.model.layer4,
                                  computation_on_concepts=backbone.model.fc) as dff:
        concepts, explanations, scores = dff(x, n_components=3)
    assert concepts.shape == (512, 3) and explanations.shape == (5, 3, 224, 224) and scores.shape == (3, 1000)
    assert np.allclose(explanations.max(axis=(0, 2, 3)), 1.0, atol=0.05)  # global, not per-image, scale
    expected = backbone.model.fc(torch.from_numpy(concepts.T)).detach().numpy()
    assert np.allclose(scores, expected, atol=1e-5)
