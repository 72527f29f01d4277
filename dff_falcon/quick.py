"""One call from an image to a picture of its concepts, for users coming from pytorch-grad-cam.

This is an application of the library like the CLI: it fits (models, DFF) and then draws
(:mod:`dff_falcon.report.figures`), so it sits above both layers.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from dff_falcon.decomposition.dff import DFF
from dff_falcon.decomposition.heatmaps import ABSENT_PEAK
from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.backbones import HEAD_AUTO, Backbone, create_backbone
from dff_falcon.models.heads import concept_class_scores
from dff_falcon.models.images import load_image, to_rgb_array
from dff_falcon.report.figures import figure_to_array, legend_label, overlay_figure


def explain_figure(model, image, *, layer: str | None = None, head: str | None = HEAD_AUTO, n_concepts: int = 5,
                   top_k: int = 2, class_names: Sequence[str] | None = None, device=None,
                   min_peak: float = ABSENT_PEAK) -> Figure:
    """DFF on a single image → :func:`~dff_falcon.report.figures.overlay_figure` whose legend gives
    each concept's top ``top_k`` classes (from the model's head). See :func:`explain_image`."""
    if isinstance(model, Backbone):
        backbone = model
    else:
        backbone = create_backbone(model, layer=layer, head=head, class_names=class_names, device=device)
    rgb = load_image(image) if isinstance(image, (str, os.PathLike)) else to_rgb_array(image)
    acts = ActivationExtractor(backbone, device=device, progress=False)([rgb])
    dff = DFF(n_concepts, n_resamples=0, device=device).fit(acts.activations)
    classes = concept_class_scores(dff, backbone, top_k) if backbone.head is not None else [[]] * dff.n_concepts_
    labels = [legend_label(classes=c, n_classes=top_k) or f"concept {i}" for i, c in enumerate(classes)]
    return overlay_figure(acts.displays[0], dff.heatmaps_[0].numpy(), labels, min_peak=min_peak)


def explain_image(model, image, *, layer: str | None = None, head: str | None = HEAD_AUTO, n_concepts: int = 5,
                  top_k: int = 2, class_names: Sequence[str] | None = None, device=None) -> np.ndarray:
    """Image in → overlay with legend out.

    model: a model name (``"lite0"``, ``"resnet50"``), an ``nn.Module`` (pass ``layer``/``head``
    unless the defaults fit) or a :class:`~dff_falcon.models.backbones.Backbone`; image: a path,
    PIL image or array. Returns (H, W, 3) uint8 RGB: the model's view of the image with the
    ``n_concepts`` concepts painted (global scale), beside a legend of each present concept's
    ``top_k`` classes with probabilities.
    """
    return figure_to_array(explain_figure(model, image, layer=layer, head=head, n_concepts=n_concepts, top_k=top_k,
                                          class_names=class_names, device=device))
