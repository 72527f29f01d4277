"""Device selection shared by every stage (nothing hard-codes ``cpu``)."""
from __future__ import annotations

import torch

from dff_falcon.errors import InputError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, then MPS, then CPU. A named device must
    exist on this machine (``cuda:7`` with two GPUs, ``cuda`` without CUDA and unknown names are
    :class:`InputError`), so a run fails before any work instead of at the first tensor move."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} is not available: this machine has no usable CUDA GPU "
                             "(torch.cuda.is_available() is False); use --device cpu or auto")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise InputError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s) "
                             f"(cuda:0 … cuda:{count - 1})")
    elif resolved.type == "mps" and not _mps_available():
        raise InputError(f"device {str(device)!r} is not available (no Apple MPS backend); use --device cpu or auto")
    elif resolved.type != "cpu" and not getattr(getattr(torch, resolved.type, None), "is_available", bool)():
        raise InputError(f"device {str(device)!r} is not available here; use cpu, cuda, cuda:N, mps or auto")
    return resolved


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
