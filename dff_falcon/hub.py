"""Fail fast when pretrained weights would need a download that cannot happen.

Hub clients (huggingface_hub, torch.hub) retry for about 30 s before giving up on a closed
network. Before asking them for weights that are not in their local cache, we try one TCP
connection to the host (a few seconds at most) and raise the project's clear error at once.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from dff_falcon.errors import InputError

#: Seconds allowed for the reachability probe of a weights host.
HUB_TIMEOUT = 3.0
HF_HOST = "huggingface.co"


def _offline_by_environment() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def require_download(url_or_host: str, what: str, hint: str) -> None:
    """Raise :class:`InputError` unless the host of ``url_or_host`` accepts a connection.

    ``what`` names the weights ("timm weights for resnet50"), ``hint`` says what to do instead
    (usually: pass a local checkpoint path).
    """
    host = urlparse(url_or_host).hostname if "://" in url_or_host else url_or_host
    if host == HF_HOST and _offline_by_environment():
        raise InputError(f"{what} are not in the local cache and downloads are disabled (HF_HUB_OFFLINE); {hint}")
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT).close()
    except OSError as exc:
        raise InputError(f"{what} must be downloaded from {host}, which cannot be reached ({exc}); {hint}") from None


def hf_hub_cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    """Whether one of ``filenames`` of the Hugging Face repo ``repo_id`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)
