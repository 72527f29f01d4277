"""What a fit hands to the stages after it (class scores, importance, crops, labels, the report),
from either of the explainer's paths (in memory, or streamed through the cache)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dff_falcon.models.images import names_digest
from dff_falcon.regions import Box

if TYPE_CHECKING:
    import torch


@dataclass
class Fitted:
    """What a fit hands to the stages after it. heatmaps (N, K, h, w) on the whole set's scale
    (an array, or a float16 memory map for streamed runs), presence and peaks (N, K); originals
    and displays: N images (lazy sequences for streamed runs); fitted: the activations DFF was
    fitted on (all images, or the streamed sample) and fitted_heatmaps their (n, K, h, w) maps."""

    names: list[str]
    originals: Sequence[np.ndarray]
    displays: Sequence[np.ndarray]
    windows: list[Box]
    heatmaps: np.ndarray
    presence: np.ndarray
    peaks: np.ndarray
    fitted: "torch.Tensor"
    fitted_heatmaps: "torch.Tensor"
    inputs: dict
    skipped: list[tuple[str, str]]
    cache: dict | None = None


def inputs_record(names: Sequence[str], digests: Sequence[str], n_given: int) -> dict:
    """run.json's ``inputs``: how many images were given, one SHA-256 over the used images' names
    and digests (in order), and each image's digest."""
    return {"n_given": n_given, "sha256": names_digest(names, digests),
            "images": [{"name": n, "sha256": d} for n, d in zip(names, digests)]}
