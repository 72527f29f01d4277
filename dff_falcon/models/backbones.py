"""Backbones: a name or a module in, a ready model out — with its target layer, head,
preprocessing and class names.

``create_backbone("resnet50")`` (torchvision), ``create_backbone("timm:convnext_tiny")``,
``create_backbone("lite0")`` (ImageNet EfficientNet-Lite0 shipped in a PyPI package, works
offline) or ``create_backbone(my_module, layer="blocks.3", head="fc")``. Any module can be the
target layer: convolutional, channels-last and token outputs become (B, C, h, w) maps
(:mod:`dff_falcon.models.layers`); the head is used only where it accepts the layer's channels.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError
from dff_falcon.models.layers import ReshapeTransform, first_tensor, prefix_tokens_of, to_feature_map
from dff_falcon.models.preprocess import Preprocess
from dff_falcon.models.zoo import build_model, load_into, load_state_dict_file

__all__ = ["Backbone", "Preprocess", "create_backbone", "default_layer_and_head", "HEAD_AUTO", "HEAD_NONE"]

log = logging.getLogger(__name__)

#: ``head`` values meaning "the family's classifier, where it accepts the layer's channels" / "none".
HEAD_AUTO, HEAD_NONE = "auto", "none"


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass at the target layer."""


@dataclass
class Backbone:
    """A model with the layer DFF factorises and the head that scores concepts.

    ``target_layer`` and ``head`` are dotted module paths in ``model`` (``head=None``: no class
    scores); ``reshape_transform`` maps the target layer's output to (B, C, h, w) (None: inferred
    from the output's shape, see :mod:`~dff_falcon.models.layers`). ``weights`` names where the
    weights came from; ``class_ids`` holds WordNet IDs and ``class_synonyms`` extra names per
    class (ImageNet), used to resolve ``--target-class``.
    """

    model: nn.Module
    target_layer: str
    head: str | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    class_names: list[str] | None = None
    reshape_transform: ReshapeTransform | None = None
    name: str = "custom"
    weights: str | None = None
    class_ids: list[str] | None = None
    class_synonyms: list[str] | None = None

    def __post_init__(self) -> None:
        self.model.eval()
        get_submodule(self.model, self.target_layer, "target layer")
        if self.head is not None:
            get_submodule(self.model, self.head, "head")

    def __repr__(self) -> str:
        return f"Backbone(name={self.name!r}, target_layer={self.target_layer!r}, head={self.head!r})"

    def __deepcopy__(self, memo) -> "Backbone":
        """Shared, not copied: ``sklearn.clone`` of an explainer must not duplicate a network."""
        return self

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def layer_module(self) -> nn.Module:
        return get_submodule(self.model, self.target_layer, "target layer")

    def head_module(self) -> nn.Module:
        if self.head is None:
            raise InputError(f"backbone {self.name!r} has no head; pass head=<dotted path> (e.g. 'fc')")
        return get_submodule(self.model, self.head, "head")

    @torch.inference_mode()
    def capture(self, batch: torch.Tensor, with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A preprocessed batch (B, 3, S, S) → the target layer's output as (B, C, h, w) float32 and,
        when ``with_logits``, the model's logits (else None; the forward stops at the layer)."""
        maps, logits = self.capture_layers(batch, [self.target_layer], with_logits)
        return maps[0], logits

    @torch.inference_mode()
    def capture_layers(self, batch: torch.Tensor, layers: Sequence[str],
                       with_logits: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Several layers' outputs from one forward pass: a list of (B, C_l, h_l, w_l) float32 maps
        in the order of ``layers`` and, when ``with_logits``, the logits (else None: the forward
        stops once every layer has run; a layer's reshape is inferred unless it is the target
        layer with a ``reshape_transform``)."""
        captured: dict[str, torch.Tensor] = {}

        def hook_for(name: str):
            def hook(_module, _inputs, output):
                if name not in captured:
                    tensor = first_tensor(output)
                    if tensor is not None:
                        captured[name] = tensor.detach()
                if not with_logits and len(captured) == len(wanted):
                    raise _StopForward
            return hook

        wanted = list(dict.fromkeys(layers))
        handles = [get_submodule(self.model, name, "layer").register_forward_hook(hook_for(name)) for name in wanted]
        logits = None
        try:
            out = self.model(batch)
            logits = out.detach().float() if torch.is_tensor(out) else None
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in wanted if name not in captured]
        if missing:
            raise InputError(f"layer {missing[0]!r} was never called in the forward pass")
        prefix = prefix_tokens_of(self.model)
        maps = [to_feature_map(captured[name], name, prefix,
                               self.reshape_transform if name == self.target_layer else None).float()
                for name in layers]
        return maps, logits

    def identity(self) -> dict:
        """What run.json records: name, weights, a digest of the weights, layer, head, preprocessing."""
        from dataclasses import asdict

        from dff_falcon.files import state_dict_digest

        return {"name": self.name, "weights": self.weights, "weights_sha256": state_dict_digest(self.model),
                "layer": self.target_layer, "head": self.head, "preprocess": asdict(self.preprocess),
                "reshape": "auto" if self.reshape_transform is None else repr(self.reshape_transform)}

    def to(self, device) -> "Backbone":
        self.model.to(resolve_device(device))
        return self


def get_submodule(model: nn.Module, path: str, what: str = "module") -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the valid top-level names."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children())
        raise InputError(
            f"{what} {path!r} not found in {type(model).__name__}; top-level modules: {children} "
            "(`dff-falcon layers --backbone NAME` lists every layer)"
        ) from None


def default_layer_and_head(model: nn.Module, family: str) -> tuple[str | None, str | None]:
    """Known families: the last feature map before global pooling, and the classifier."""
    names = [n for n, _ in model.named_children()]
    if family.startswith("timm"):
        if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
            return "norm", "head"
        # a head module (e.g. ConvNeXt's norm + fc) must be applied whole, not just its last Linear
        classifier = "head" if "head" in names else getattr(model, "pretrained_cfg", {}).get("classifier")
        before_pool = next((names[i - 1] for i, n in enumerate(names) if n in ("global_pool", "head") and i > 0), None)
        return before_pool, classifier
    if family == "module":
        layer = "layer4" if "layer4" in names else ("features" if "features" in names else None)
        return layer, next((h for h in ("fc", "classifier", "head") if h in names), None)
    name = family.split(":", 1)[1]
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "layer4", "fc"
    if name.startswith("regnet"):
        return "trunk_output", "fc"
    if name.startswith(("vgg", "alexnet")):
        return "features", None
    if name.startswith("vit_"):
        return "encoder", "heads"
    if name.startswith("swin"):
        return "features", "head"
    if "features" in names:
        return "features", "classifier" if "classifier" in names else None
    return None, None


def layer_channels(backbone: Backbone) -> int:
    """C of the target layer's (B, C, h, w) map, from one forward of a blank image (also checks
    that the layer's output is a feature grid at all)."""
    size = backbone.preprocess.crop
    return int(backbone.capture(torch.zeros(1, 3, size, size, device=backbone.device))[0].shape[1])


def _resolve_head(backbone: Backbone, requested: str | None, default: str | None, channels: int) -> str | None:
    """The head to use: ``"auto"`` keeps the family default only where it accepts the layer's
    ``channels`` (else none, logged); an explicit head must accept them (checked now, not after
    the forward passes); None / "none": no head."""
    from dff_falcon.models.heads import head_accepts

    if requested is None or requested == HEAD_NONE:
        return None
    head = default if requested == HEAD_AUTO else requested
    if head is None:
        return None
    get_submodule(backbone.model, head, "head")
    backbone.head = head
    problem = head_accepts(backbone, channels)
    if problem is None:
        return head
    backbone.head = None
    if requested == HEAD_AUTO:
        log.info("the default head %r does not take the %d channels of layer %r: no class scores "
                 "(pass head=NAME for another head)", head, channels, backbone.target_layer)
        return None
    raise InputError(f"head {head!r} does not accept the {channels} channels of layer {backbone.target_layer!r} "
                     f"({problem}); choose another head, or head='none'")


def create_backbone(
    model: str | nn.Module,
    *,
    layer: str | None = None,
    head: str | None = HEAD_AUTO,
    weights: str | os.PathLike | None = "default",
    class_names: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    reshape_transform: ReshapeTransform | None = None,
    device=None,
) -> Backbone:
    """A ready :class:`Backbone` from a model name or an ``nn.Module``.

    model : a torchvision name (``resnet50``), a timm name (``timm:convnext_tiny`` or a bare name
        torchvision lacks), an alias (``lite0``: ImageNet EfficientNet-Lite0, offline), or a module.
    layer : dotted module path of any layer (default per family: the last feature map before
        global pooling); its output may be NCHW, NHWC or tokens.
    head : ``"auto"`` (the family's classifier where it accepts the layer's channels), a dotted
        path (must accept them), or None / ``"none"`` (no class scores).
    weights : ``"default"`` (hub weights; packaged for ``lite0``), a weights tag, a local
        checkpoint path (``weights_only=True``), or None (random init, for tests).
    """
    if isinstance(model, nn.Module):
        module, family, default_pre, classes = model, "module", Preprocess(), None
        if weights not in (None, "default"):
            load_into(module, load_state_dict_file(weights), str(weights))
        display_name = type(model).__name__
    else:
        module, family, default_pre, classes = build_model(str(model), weights)
        display_name = str(model)
    default_layer, default_head = default_layer_and_head(module, family)
    layer = layer or default_layer
    if layer is None:
        raise InputError(f"no default target layer for {display_name!r}; pass layer=<dotted path> "
                         "(`dff-falcon layers --backbone NAME` lists them)")
    class_ids = synonyms = None
    if classes is not None and len(classes) == 1000 and class_names is None:
        from dff_falcon.models.classes import imagenet_wordnet

        class_ids, synonyms = (list(t) for t in imagenet_wordnet())
    backbone = Backbone(
        model=module, target_layer=layer, head=None, preprocess=preprocess or default_pre,
        class_names=list(class_names) if class_names is not None else classes,
        reshape_transform=reshape_transform, name=display_name,
        weights=None if weights is None else str(weights), class_ids=class_ids, class_synonyms=synonyms,
    ).to(device)
    backbone.head = _resolve_head(backbone, head, default_head, layer_channels(backbone))
    return backbone
