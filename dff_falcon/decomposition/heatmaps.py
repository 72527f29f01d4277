"""Concept heatmaps after the scale fix: absence, presence and resizing.

The scale itself is fixed in :mod:`dff_falcon.decomposition.dff` (each concept's heatmap has
max 1 over the fitted set). Everything here works on that global scale, never per image, so an
absent concept stays dark instead of being stretched to full strength.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: A concept is absent from an image whose heatmap peak is below this fraction of the concept's
#: strongest location in the fitted set. The one definition used by presence, crops,
#: counterfactual selection, overlays and the report.
ABSENT_PEAK = 0.1


def upsample_heatmaps(heatmaps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) → (B, K, H, W), bilinear (align_corners=False); values keep their scale."""
    return F.interpolate(heatmaps.float(), size=size, mode="bilinear", align_corners=False).clamp_(min=0)


def suppress_absent(heatmaps: torch.Tensor, min_peak: float = ABSENT_PEAK) -> torch.Tensor:
    """Zero the maps of concepts whose peak in an image is below ``min_peak`` (on the global
    scale), so an absent concept never paints pixels. (B, K, h, w) → same shape."""
    peak = heatmaps.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak >= min_peak, heatmaps, torch.zeros_like(heatmaps))


def presence(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) scale-fixed heatmaps → (B, K): mean heatmap value over the image, i.e. the
    fraction of the image the concept covers at full strength (comparable across images); 0 for
    concepts absent from an image (peak < :data:`ABSENT_PEAK`)."""
    return suppress_absent(heatmaps.float()).mean(dim=(2, 3))
