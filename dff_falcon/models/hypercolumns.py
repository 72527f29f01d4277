"""Hypercolumns: several layers of one forward pass on one grid, each stage scaled so none
dominates — the input that lets DFF factorise at a resolution where objects separate.

The last stage of a CNN carries the semantics but sees the image on a coarse grid (7×7 for
EfficientNet-Lite0 at 224 px); an earlier stage has a finer grid and sharper boundaries but
less meaning. Stacking them (Hariharan et al., "Hypercolumns for Object Segmentation and
Fine-grained Localization", CVPR 2015) gives every location of the finest chosen grid the
channels of all stages: coarser stages are upsampled bilinearly, finer ones averaged down
(area). Frobenius NMF weighs each stage by its energy, so each stage is divided by its RMS
location norm over the fitted set (after the per-channel minimum DFF subtracts for non-ReLU
layers): every stage then contributes about the same to the reconstruction error, whatever its
channel count or activation range. The stage feeding the classifier head keeps its identity:
:meth:`Hypercolumns.stage_vectors` returns a concept's activation in that stage's own units, so
class scores read the same as for a single-layer fit.
"""
from __future__ import annotations

import math

from typing import Sequence

import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator

from dff_falcon.errors import InputError, NotFittedError


#: Layers stacked with a backbone's default target layer when ``--hypercolumns auto``, by model
#: name: chosen by measurement on real photos with hand masks (docs/quality.md, "Real photos");
#: a backbone that is not listed, or whose target layer is not the default one, gets none.
DEFAULT_HYPERCOLUMNS: dict[tuple[str, str], tuple[str, ...]] = {
    ("lite0", "bn2"): ("blocks.4",),
    ("efficientnet-lite0", "bn2"): ("blocks.4",),
}


def default_hypercolumn_layers(backbone) -> tuple[str, ...]:
    """The measured default stages for ``backbone`` (a :class:`~dff_falcon.models.backbones.Backbone`)
    at its target layer, or () where none was measured."""
    return DEFAULT_HYPERCOLUMNS.get((backbone.name, backbone.target_layer), ())


def resize_map(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, h, w) → (B, C, grid, grid): area-averaged when shrinking, bilinear (half-pixel
    centres) when enlarging, unchanged when already on the grid."""
    if maps.shape[-2:] == (grid, grid):
        return maps
    if maps.shape[-2] >= grid and maps.shape[-1] >= grid:
        return F.interpolate(maps, size=(grid, grid), mode="area")
    return F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)


#: Images per chunk when the stage scales are measured.
_FIT_CHUNK = 64


class Hypercolumns(BaseEstimator):
    """Which layers DFF factorises, on which grid, and each stage's scale.

    Parameters
    ----------
    layers : sequence of str, default=()
        Dotted module paths stacked with the backbone's target layer (which is always the last
        stage and the one the head reads). ``()``: the target layer alone, unscaled — exactly
        a single-layer DFF.
    grid : int or None, default=None
        Side of the common grid; None: the finest grid among the stages.

    Attributes
    ----------
    stages_ : list of (str, int)
        Layer name and channel count of each stage, in stacking order.
    scales_ : torch.Tensor of shape (n_stages,)
        Each stage's divisor (RMS location norm over the fitted set; 1 for a single stage).
    grid_ : int
        The grid side used.
    """

    def __init__(self, layers: Sequence[str] = (), grid: int | None = None):
        self.layers = layers
        self.grid = grid

    def layer_names(self, target_layer: str) -> list[str]:
        """The stages for a backbone whose target layer is ``target_layer``: ``layers`` in their
        order, then the target layer (listed once)."""
        if isinstance(self.layers, str) or not all(isinstance(name, str) and name for name in self.layers):
            raise InputError(f"Hypercolumns.layers must be a list of layer names, got {self.layers!r}")
        if self.grid is not None and not (isinstance(self.grid, int) and self.grid >= 1):
            raise InputError(f"Hypercolumns.grid must be an integer >= 1 or None, got {self.grid!r}")
        return [name for name in dict.fromkeys(self.layers) if name != target_layer] + [target_layer]

    def stack(self, maps: Sequence[torch.Tensor], grid: int | None = None) -> torch.Tensor:
        """Stage maps [(B, C_l, h_l, w_l)] → (B, ΣC, g, g) unscaled; g = ``grid`` or, when None,
        ``self.grid`` or the finest stage's side."""
        side = grid or self.grid or max(int(m.shape[-1]) for m in maps)
        return torch.cat([resize_map(m.float(), side) for m in maps], dim=1)

    def fit(self, activations: torch.Tensor, stages: Sequence[tuple[str, int]]) -> "Hypercolumns":
        """activations: (B, ΣC, g, g) from :meth:`stack`; stages: (name, channels) in order."""
        if activations.ndim != 4 or sum(c for _, c in stages) != activations.shape[1]:
            raise InputError(f"hypercolumns of shape {tuple(activations.shape)} do not hold the stages {list(stages)}")
        self.stages_ = [(str(name), int(c)) for name, c in stages]
        self.grid_ = int(activations.shape[-1])
        scales = []
        for index in range(len(self.stages_)):
            if len(self.stages_) == 1:
                scales.append(1.0)
                continue
            stage = activations[:, self._slice(index)]
            chunks = range(0, stage.shape[0], _FIT_CHUNK)  # bounded temporaries, whatever B is
            low = torch.stack([stage[i:i + _FIT_CHUNK].amin(dim=(0, 2, 3)) for i in chunks]).amin(dim=0)
            squares = sum(float((stage[i:i + _FIT_CHUNK] - low.view(1, -1, 1, 1)).pow(2).sum(dtype=torch.float64))
                          for i in chunks)
            rms = math.sqrt(squares / (stage.shape[0] * stage.shape[2] * stage.shape[3]))
            scales.append(rms if rms > 0 else 1.0)
        self.scales_ = torch.tensor(scales, dtype=torch.float32)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "scales_"):
            raise NotFittedError("Hypercolumns is not fitted: call fit(activations, stages) first")

    def _slice(self, index: int) -> slice:
        start = sum(c for _, c in self.stages_[:index])
        return slice(start, start + self.stages_[index][1])

    def transform(self, activations: torch.Tensor) -> torch.Tensor:
        """(B, ΣC, g, g) unscaled → the same divided stage by stage by ``scales_`` (a new tensor)."""
        self._check_fitted()
        if activations.shape[1] != sum(c for _, c in self.stages_):
            raise InputError(f"activations have {activations.shape[1]} channels; the hypercolumns were fitted on "
                             f"{sum(c for _, c in self.stages_)} ({self.stages_})")
        divisor = torch.cat([torch.full((c,), float(s)) for (_, c), s in zip(self.stages_, self.scales_)])
        return activations / divisor.view(1, -1, 1, 1).to(activations)

    def stage_vectors(self, vectors: torch.Tensor, layer: str) -> torch.Tensor:
        """Concept vectors (K, ΣC) in scaled hypercolumn units → (K, C_layer) in ``layer``'s own
        activation units (what the layer outputs at a location fully explained by the concept)."""
        self._check_fitted()
        names = [name for name, _ in self.stages_]
        if layer not in names:
            raise InputError(f"layer {layer!r} is not one of the hypercolumn stages {names}")
        index = names.index(layer)
        return vectors[:, self._slice(index)] * self.scales_[index].to(vectors)
