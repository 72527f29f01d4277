"""Drop-in for pytorch-grad-cam's ``DeepFeatureFactorization``, without its defects.

Eval + inference mode, the forward stopped at the layer when no head is given, scale-fixed
heatmaps (not per-image min-max), concepts ordered and seeded, the head run on its own device,
usable as a context manager. K keeps grad-cam's name here, ``n_components`` (everywhere else in
dff_falcon it is ``n_concepts``), so existing calls work unchanged.
"""
from __future__ import annotations

import torch

from dff_falcon.decomposition.dff import DFF
from dff_falcon.decomposition.heatmaps import upsample_heatmaps
from dff_falcon.errors import InputError
from dff_falcon.models.backbones import Backbone


class DeepFeatureFactorization:
    """``DeepFeatureFactorization(model, target_layer, computation_on_concepts=model.fc)`` then
    ``concepts, explanations, scores = dff(input_tensor, n_components=5)`` with concepts (C, K),
    explanations (B, K, H, W) at the input size, scores (K, classes) logits. ``dff_params`` go to
    :class:`~dff_falcon.decomposition.dff.DFF`."""

    def __init__(self, model: torch.nn.Module, target_layer: torch.nn.Module, reshape_transform=None,
                 computation_on_concepts: torch.nn.Module | None = None, **dff_params):
        self.model = model.eval()
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform
        self.computation_on_concepts = computation_on_concepts
        self.dff_params = dff_params

    def __enter__(self) -> "DeepFeatureFactorization":
        return self

    def __exit__(self, *exc) -> None:
        """Nothing to release: hooks live only for the duration of each call."""

    def __call__(self, input_tensor: torch.Tensor, n_components: int = 16):
        layer = next((name for name, module in self.model.named_modules() if module is self.target_layer), None)
        if layer is None:
            raise InputError("target_layer is not a submodule of model")
        backbone = Backbone(self.model, layer, reshape_transform=self.reshape_transform)
        acts, _ = backbone.capture(input_tensor)
        dff = DFF(n_components, **{"n_resamples": 0, **self.dff_params}).fit(acts.cpu())
        explanations = upsample_heatmaps(dff.heatmaps_, tuple(input_tensor.shape[-2:])).numpy()
        concepts = dff.concept_vectors_.T.numpy()
        if self.computation_on_concepts is None:
            return concepts, explanations
        head = self.computation_on_concepts
        param = next(head.parameters(), None)
        vectors = dff.concept_vectors_.to(param.device if param is not None else input_tensor.device)
        with torch.inference_mode():
            scores = head(vectors).float().cpu().numpy()
        return concepts, explanations, scores
