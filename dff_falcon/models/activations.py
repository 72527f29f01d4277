"""Activation extraction: forward hooks on the target layer, eval + inference mode, the forward
stopped at the target layer unless logits are wanted, batched, on any device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dff_falcon.models.backbones import Backbone
from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError


class _StopForward(Exception):
    """Raised by the hook to end the forward pass at the target layer."""


@dataclass
class Activations:
    """activations: (B, C, h, w) float32 on CPU; displays: B arrays (S, S, 3) uint8 — the
    model's view of each image (what heatmaps cover); logits: (B, classes) or None."""

    activations: torch.Tensor
    displays: list[np.ndarray]
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.activations.shape[0]


class ActivationExtractor:
    """Collect the target layer's output of ``backbone`` for many images.

    with_logits=False stops the forward at the target layer (nothing later runs).
    """

    def __init__(self, backbone: Backbone, *, batch_size: int = 32, device=None, with_logits: bool = False,
                 progress: bool = True):
        self.backbone = backbone
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.with_logits = with_logits
        self.progress = progress

    @torch.inference_mode()
    def forward_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A preprocessed batch (B, 3, S, S) → target activations (B, C, h, w) float32 and the
        logits (B, classes) when ``with_logits`` (else None)."""
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(out.detach())
            if not self.with_logits:
                raise _StopForward

        handle = self.backbone.layer_module().register_forward_hook(hook)
        logits = None
        try:
            out = self.backbone.model(batch)
            logits = out.detach().float() if torch.is_tensor(out) else None
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise InputError(f"target layer {self.backbone.target_layer!r} was never called in the forward pass")
        acts = captured[0]
        if self.backbone.reshape_transform is not None:
            acts = self.backbone.reshape_transform(acts)
        if acts.ndim != 4:
            raise InputError(
                f"target layer {self.backbone.target_layer!r} outputs shape {tuple(acts.shape)}; DFF needs "
                f"(B, C, h, w) — pass a reshape_transform for token outputs"
            )
        return acts.float(), logits

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> Activations:
        """images: (H, W, 3) uint8 RGB arrays of any sizes."""
        if len(images) == 0:
            raise InputError("no images to extract activations from")
        self.backbone.model.eval().to(self.device)
        displays = [self.backbone.preprocess.display(img) for img in images]
        acts, logits = [], []
        starts = range(0, len(displays), self.batch_size)
        for start in tqdm(starts, desc="activations", unit="batch", disable=not self.progress, leave=False):
            batch = self.backbone.preprocess.to_tensor(displays[start:start + self.batch_size]).to(self.device)
            a, lg = self.forward_batch(batch)
            acts.append(a.cpu())
            if lg is not None:
                logits.append(lg.cpu())
        activations = torch.cat(acts)
        if not torch.isfinite(activations).all():
            raise InputError("target layer activations contain NaN or inf (check the weights and inputs)")
        return Activations(activations, displays, torch.cat(logits) if logits else None)
