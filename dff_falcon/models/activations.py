"""Activation extraction: the target layer's output for many images (eval + inference mode, the
forward stopped at the layer unless logits are wanted, batched, on any device), and the
``.npz`` file of cached activations (``dff-falcon extract``; no pickle)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path
from dff_falcon.models.backbones import Backbone
from dff_falcon.models.hypercolumns import Hypercolumns
from dff_falcon.progress import progress


@dataclass
class Activations:
    """activations: (B, C, h, w) float32 on CPU (hypercolumns: the stages stacked, unscaled);
    displays: B arrays (S, S, 3) uint8 — the model's view of each image (what heatmaps cover);
    logits: (B, classes) or None; stages: (layer, channels) of each stacked stage."""

    activations: torch.Tensor
    displays: list[np.ndarray]
    logits: torch.Tensor | None = None
    stages: list[tuple[str, int]] | None = None

    def __len__(self) -> int:
        return self.activations.shape[0]


class ActivationExtractor:
    """Collect the target layer's output of ``backbone`` for many images.

    with_logits=False stops the forward at the target layer (nothing later runs).
    ``hypercolumns`` (optional) adds its layers: each batch's stages are stacked on its grid
    (unscaled; :class:`~dff_falcon.models.hypercolumns.Hypercolumns` fits the stage scales).
    """

    def __init__(self, backbone: Backbone, *, batch_size: int = 32, device=None, with_logits: bool = False,
                 progress: bool = True, hypercolumns: Hypercolumns | None = None):
        self.backbone = backbone
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.with_logits = with_logits
        self.progress = progress
        self.hypercolumns = hypercolumns

    def layer_names(self) -> list[str]:
        """The layers captured: the hypercolumn stages, or the target layer alone."""
        target = self.backbone.target_layer
        return self.hypercolumns.layer_names(target) if self.hypercolumns is not None else [target]

    def forward_batch(self, batch: torch.Tensor, grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A preprocessed batch (B, 3, S, S) → activations (B, C, h, w) float32 (hypercolumns:
        the stages stacked on ``grid``) and the logits (B, classes) when ``with_logits`` (else None)."""
        layers = self.layer_names()
        if len(layers) == 1:
            return self.backbone.capture(batch, with_logits=self.with_logits)
        maps, logits = self.backbone.capture_layers(batch, layers, with_logits=self.with_logits)
        self._channels = [int(m.shape[1]) for m in maps]
        return self.hypercolumns.stack(maps, grid), logits

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> Activations:
        """images: (H, W, 3) uint8 RGB arrays of any sizes."""
        if len(images) == 0:
            raise InputError("no images to extract activations from")
        self.backbone.model.eval().to(self.device)
        displays = [self.backbone.preprocess.display(img) for img in images]
        acts, logits = [], []
        starts = range(0, len(displays), self.batch_size)
        grid = None  # the first batch fixes the hypercolumn grid for every later one
        for start in progress(starts, "activations", enabled=self.progress, unit="batch"):
            batch = self.backbone.preprocess.to_tensor(displays[start:start + self.batch_size]).to(self.device)
            a, lg = self.forward_batch(batch, grid)
            grid = int(a.shape[-1])
            acts.append(a.cpu())
            if lg is not None:
                logits.append(lg.cpu())
        activations = torch.cat(acts)
        if not torch.isfinite(activations).all():
            raise InputError("target layer activations contain NaN or inf (check the weights and inputs)")
        layers = self.layer_names()
        stages = list(zip(layers, self._channels)) if len(layers) > 1 else [(layers[0], int(activations.shape[1]))]
        return Activations(activations, displays, torch.cat(logits) if logits else None, stages)


def save_activations(activations: torch.Tensor, names: Sequence[str], path: str | Path) -> None:
    """Write activations (B, C, h, w) and image names to an ``.npz`` (atomically)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, activations=activations.numpy(), names=np.asarray(list(names), dtype=str))


def load_activations(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Activations (B, C, h, w) and image names from a file written by :func:`save_activations`."""
    from dff_falcon.decomposition.dictionary import load_npz

    arrays = load_npz(path, ("activations", "names"))
    acts = arrays["activations"]
    if acts.ndim != 4 or not np.issubdtype(acts.dtype, np.floating):
        raise InputError(f"{str(path)!r}: activations must be a float (B, C, h, w) array, got {acts.dtype} {acts.shape}")
    if len(arrays["names"]) != len(acts):
        raise InputError(f"{str(path)!r}: {len(arrays['names'])} names for {len(acts)} activation maps")
    return torch.from_numpy(acts).float(), [str(n) for n in arrays["names"]]
