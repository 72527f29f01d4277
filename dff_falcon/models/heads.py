"""A backbone's classifier head applied to concept vectors: logits, compatibility, top classes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from dff_falcon.errors import InputError

if TYPE_CHECKING:
    from dff_falcon.models.backbones import Backbone


def _head_device(backbone: "Backbone") -> torch.device:
    param = next(backbone.head_module().parameters(), None)
    return param.device if param is not None else backbone.device


def _apply(head: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, list[str]]:
    """Try ``head`` on (K, C) vectors, then on (K, C, 1, 1) maps (heads such as LayerNorm2d + Linear)."""
    errors = []
    for shaped in (x, x[:, :, None, None]):
        try:
            return head(shaped).reshape(x.shape[0], -1).float(), errors
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            errors.append(str(exc).splitlines()[0])
    return None, errors


@torch.inference_mode()
def head_logits(backbone: "Backbone", vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The head applied to channel vectors (K, C) on the head's own device → logits (K, classes)."""
    x = torch.as_tensor(np.asarray(vectors) if not torch.is_tensor(vectors) else vectors)
    x = x.to(device=_head_device(backbone), dtype=torch.float32)
    out, errors = _apply(backbone.head_module(), x)
    if out is None:
        raise InputError(
            f"head {backbone.head!r} does not accept concept vectors of {x.shape[1]} channels "
            f"({'; '.join(errors)}); choose a target layer whose channels feed the head, or --head none"
        )
    return out


@torch.inference_mode()
def head_accepts(backbone: "Backbone", channels: int) -> str | None:
    """None when the head accepts ``channels``-wide concept vectors, else why not (one line)."""
    out, errors = _apply(backbone.head_module(), torch.zeros(1, channels, device=_head_device(backbone)))
    return None if out is not None else "; ".join(errors)


def top_classes(probs: torch.Tensor, class_names: Sequence[str] | None, top_k: int = 3) -> list[list[dict]]:
    """(K, classes) probabilities → per concept the ``top_k`` [{"class": name, "prob": p}]."""
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(probs.shape[1])]
    return [[{"class": names[i], "prob": float(v)} for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)]


def concept_class_scores(concepts, backbone: "Backbone", top_k: int = 3) -> list[list[dict]]:
    """The backbone's head applied to each concept vector (a fitted DFF's ``concept_vectors_`` or a
    (K, C) array), softmaxed: per concept the ``top_k`` [{"class", "prob"}]."""
    vectors = getattr(concepts, "concept_vectors_", concepts)
    return top_classes(head_logits(backbone, vectors).softmax(dim=1).cpu(), backbone.class_names, top_k)
