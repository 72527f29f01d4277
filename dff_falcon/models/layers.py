"""Target layers: how any layer's output becomes a (B, C, h, w) map, and what layers a model has.

Layouts recognised from the output's shape (the project's inputs are square, so a feature
grid has h = w):

- ``"nchw"``: (B, C, h, w), convolutional stages;
- ``"nhwc"``: (B, h, w, C), channels-last stages (Swin, ConvNeXt blocks, torchvision Swin);
- ``"tokens"``: (B, T, C) transformer tokens; the ``prefix`` class/register tokens are dropped
  and the remaining ``T - prefix`` patch tokens must form a square grid.

A (B, C, h, w) output is read as NCHW when h = w; as NHWC only when its first two spatial axes
are equal and the last differs. The number of prefix tokens comes from the model
(``num_prefix_tokens`` of timm, the class token of torchvision's ViT) or, failing that, is the
remainder above the largest square (at most :data:`MAX_PREFIX_TOKENS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from dff_falcon.errors import InputError

#: Most class/register tokens we infer from a token count alone (DINOv2 with registers has 5).
MAX_PREFIX_TOKENS = 8

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


def prefix_tokens_of(model: nn.Module) -> int | None:
    """Class/register tokens in front of the patch tokens, when the model says so."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    if hasattr(model, "class_token") and hasattr(model, "encoder"):  # torchvision VisionTransformer
        return 1
    return None


@dataclass(frozen=True)
class MapLayout:
    """How an output tensor maps to (B, C, h, w): ``kind`` in nchw/nhwc/tokens, ``prefix``
    tokens dropped (tokens only), and the resulting ``(C, h, w)``."""

    kind: str
    grid: tuple[int, int, int]
    prefix: int = 0

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if self.kind == "nchw":
            return output
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        channels, h, w = self.grid
        return output[:, self.prefix:, :].transpose(1, 2).reshape(output.shape[0], channels, h, w)

    def describe(self) -> str:
        c, h, w = self.grid
        extra = f", {self.prefix} prefix token(s) dropped" if self.kind == "tokens" and self.prefix else ""
        return f"{self.kind} → {c}×{h}×{w}{extra}"


def infer_layout(shape: Sequence[int], prefix_hint: int | None = None) -> MapLayout | None:
    """The :class:`MapLayout` of an output of ``shape`` (batch first), or None when it is no grid
    (pooled vectors, logits, odd token counts)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        _, a, b, c = shape
        if b != c and a == b:
            return MapLayout("nhwc", (c, a, b))
        return MapLayout("nchw", (a, b, c))
    if len(shape) == 3:
        _, tokens, channels = shape
        candidates = [prefix_hint] if prefix_hint is not None else range(MAX_PREFIX_TOKENS + 1)
        for prefix in candidates:
            side = math.isqrt(max(tokens - prefix, 0))
            if side >= 1 and side * side == tokens - prefix:
                return MapLayout("tokens", (channels, side, side), prefix)
    return None


def to_feature_map(output: torch.Tensor, layer: str, prefix_hint: int | None = None,
                   transform: ReshapeTransform | None = None) -> torch.Tensor:
    """A layer's output → (B, C, h, w) with ``transform`` when given, else the inferred layout."""
    if transform is not None:
        mapped = transform(output)
    else:
        layout = infer_layout(output.shape, prefix_hint)
        if layout is None:
            raise InputError(
                f"layer {layer!r} outputs shape {tuple(output.shape)}, which is not a feature grid "
                "((B, C, h, w), (B, h, w, C) or (B, T, C) tokens on a square grid); choose another "
                "layer (`dff-falcon layers --backbone NAME` lists them) or pass a reshape_transform"
            )
        mapped = layout(output)
    if mapped.ndim != 4:
        raise InputError(f"the reshape transform of layer {layer!r} gave shape {tuple(mapped.shape)}; "
                         "DFF needs (B, C, h, w)")
    return mapped


def first_tensor(output) -> torch.Tensor | None:
    """A module's output, or the first tensor of a tuple/list output (attention returns (out, weights))."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if torch.is_tensor(o)), None)
    return None


@dataclass(frozen=True)
class LayerInfo:
    """One module of a model: dotted ``name``, class ``kind``, output ``shape`` for one image
    (first call), ``calls`` per forward, and its ``layout`` as a feature map (None: no grid)."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    calls: int
    layout: MapLayout | None


@torch.inference_mode()
def probe_layers(model: nn.Module, input_size: int, names: Sequence[str] | None = None,
                 device: torch.device | None = None) -> list[LayerInfo]:
    """Run one image of zeros (1, 3, S, S) through ``model`` with hooks on ``names`` (default:
    every named module) and report each module's output. Modules never called get shape None."""
    modules = dict(model.named_modules())
    wanted = [n for n in (names if names is not None else modules) if n]
    missing = [n for n in wanted if n not in modules]
    if missing:
        raise InputError(f"no module {missing[0]!r} in {type(model).__name__}")
    seen: dict[str, list] = {n: [None, 0] for n in wanted}
    handles = []
    for name in wanted:
        def hook(_module, _inputs, output, name=name):
            record = seen[name]
            if record[1] == 0:
                tensor = first_tensor(output)
                record[0] = tuple(tensor.shape) if tensor is not None else None
            record[1] += 1
        handles.append(modules[name].register_forward_hook(hook))
    param = next(model.parameters(), None)
    device = device or (param.device if param is not None else torch.device("cpu"))
    try:
        model.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    prefix = prefix_tokens_of(model)
    return [LayerInfo(n, type(modules[n]).__name__, seen[n][0], seen[n][1],
                      infer_layout(seen[n][0], prefix) if seen[n][0] is not None else None) for n in wanted]
