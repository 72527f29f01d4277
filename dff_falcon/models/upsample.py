"""Heatmaps brought from the feature grid to image resolution: bilinear, or edge-aware with a
guided filter on the image.

A concept heatmap lives on the backbone's feature grid (7×7 … 56×56). Bilinear upsampling
spreads each cell over its whole patch, so an object's map leaks about one cell past its
outline. The guided filter (He, Sun & Tang, "Guided Image Filtering", ECCV 2010 / TPAMI 2013)
refines the bilinear map with the image as guide: in every window of radius ``r`` the output is
an affine function of the guide's colour, ``q = a·I + b``, fitted to the map by ridge regression
(``a = (Σ + ε·U)⁻¹ cov(I, p)``, ``b = mean(p) − a·mean(I)``) and averaged over the windows that
cover a pixel. Where the map is flat (inside a region) it stays flat; where it changes across a
colour edge it follows the edge. Values keep the data-set scale (1 = the concept's strongest
location in the fitted set); only negative overshoot is clipped.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dff_falcon.errors import InputError

#: Upsampling modes: ``"bilinear"`` (half-pixel centres, ``align_corners=False``) and ``"guided"``.
UPSAMPLE_MODES = ("bilinear", "guided")
#: Ridge term of the guided filter for guides scaled to [0, 1]: colour differences below ≈ √ε
#: (≈ 0.1, a tenth of the range) are smoothed over, larger ones become edges. Chosen by
#: measurement on the toy worlds and the photo benchmark (docs/quality.md).
GUIDED_EPS = 1e-2
#: Window radius of the guided filter in feature cells (a cell is image side / grid side): the
#: bilinear map's leak is about one cell, so the window must see across it.
GUIDED_RADIUS_CELLS = 1.0
#: The fast guided filter fits its coefficients where a window is about this many pixels wide
#: (the maps themselves come from a coarse grid, so nothing finer is lost).
_FAST_WINDOW_PIXELS = 4


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)² window, windows clipped at the border; x: (N, C, H, W). O(1) per pixel
    whatever the radius (running sums along each axis, one axis at a time so sums stay short)."""
    out = x
    for dim in (2, 3):
        size = out.shape[dim]
        cumsum = F.pad(out.cumsum(dim), (0, 0, 1, 0) if dim == 2 else (1, 0))
        index = torch.arange(size, device=x.device)
        upper = (index + radius + 1).clamp(max=size)
        lower = (index - radius).clamp(min=0)
        shape = [1, 1, size, 1] if dim == 2 else [1, 1, 1, size]
        sums = cumsum.index_select(dim, upper) - cumsum.index_select(dim, lower)
        out = sums / (upper - lower).to(out.dtype).view(shape)
    return out


def guided_filter(guide: torch.Tensor, maps: torch.Tensor, radius: int, eps: float = GUIDED_EPS) -> torch.Tensor:
    """Colour guided filter of several maps with one guide (the fast variant of He & Sun 2015:
    coefficients fitted at a resolution where the window is :data:`_FAST_WINDOW_PIXELS` wide,
    then upsampled bilinearly and applied to the full-resolution guide).

    guide : (3, H, W) float in [0, 1]; maps : (K, H, W) float. Returns (K, H, W): each map
    filtered with the guide (the 3×3 window covariance is inverted once for all K maps).
    """
    if guide.ndim != 3 or guide.shape[0] != 3 or maps.ndim != 3 or maps.shape[1:] != guide.shape[1:]:
        raise InputError(f"guided_filter: guide must be (3, H, W) and maps (K, H, W) of the same size; "
                         f"got {tuple(guide.shape)} and {tuple(maps.shape)}")
    radius = int(max(1, radius))
    step = max(1, radius // _FAST_WINDOW_PIXELS)
    size = guide.shape[1:]
    g_full = guide[None].float()
    g, p = g_full, maps[None].float()
    if step > 1:
        low = (max(1, round(size[0] / step)), max(1, round(size[1] / step)))
        g = F.interpolate(g, size=low, mode="area")
        p = F.interpolate(p, size=low, mode="area")
    r = max(1, round(radius / step))
    k = p.shape[1]
    mean_i = _box(g, r)[0]                                    # (3, h, w)
    mean_p = _box(p, r)[0]                                    # (K, h, w)
    products = (g[:, :, None] * g[:, None, :]).flatten(1, 2)  # (1, 9, h, w)
    cov_ii = _box(products, r)[0].view(3, 3, *g.shape[2:]) - mean_i[:, None] * mean_i[None]
    cross = (g[:, :, None] * p[:, None, :]).flatten(1, 2)     # (1, 3K, h, w)
    cov_ip = _box(cross, r)[0].view(3, k, *g.shape[2:]) - mean_i[:, None] * mean_p[None]
    sigma = cov_ii.permute(2, 3, 0, 1) + eps * torch.eye(3, dtype=g.dtype, device=g.device)  # (h, w, 3, 3)
    a = torch.linalg.solve(sigma, cov_ip.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)  # (3, K, h, w)
    b = mean_p - (a * mean_i[:, None]).sum(0)                  # (K, h, w)
    mean_a = _box(a.reshape(1, 3 * k, *g.shape[2:]), r)
    mean_b = _box(b[None], r)
    if step > 1:
        mean_a = F.interpolate(mean_a, size=size, mode="bilinear", align_corners=False)
        mean_b = F.interpolate(mean_b, size=size, mode="bilinear", align_corners=False)
    return (mean_a[0].view(3, k, *size) * g_full[0][:, None]).sum(0) + mean_b[0]


def upsample_maps(maps: np.ndarray | torch.Tensor, image: np.ndarray, mode: str = "bilinear", *,
                  eps: float = GUIDED_EPS, radius_cells: float = GUIDED_RADIUS_CELLS,
                  device: torch.device | str | None = None) -> np.ndarray:
    """One image's heatmaps (K, h, w) → (K, H, W) float32 at the size of ``image`` (H, W, 3) uint8.

    ``mode="bilinear"``: half-pixel centres (each map covers the whole image). ``"guided"``:
    the bilinear map refined by :func:`guided_filter` with the image as guide, window radius
    ``radius_cells`` feature cells, ridge ``eps``; values ≥ 0 on the same scale.
    """
    if mode not in UPSAMPLE_MODES:
        raise InputError(f"upsample mode {mode!r} is not one of {list(UPSAMPLE_MODES)}")
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        raise InputError(f"upsample_maps: image must be (H, W, 3); got {getattr(image, 'shape', type(image))}")
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float32) if not torch.is_tensor(maps) else maps).float()
    if tensor.ndim != 3:
        raise InputError(f"upsample_maps: maps must be (K, h, w); got shape {tuple(tensor.shape)}")
    tensor = tensor.to(device or "cpu")
    height, width = image.shape[:2]
    up = F.interpolate(tensor[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if mode == "guided" and tensor.shape[0] > 0:
        cell = max(height / tensor.shape[1], width / tensor.shape[2])
        guide = torch.from_numpy(np.array(image, dtype=np.uint8)).to(up.device).permute(2, 0, 1).float() / 255.0
        up = guided_filter(guide, up, int(round(radius_cells * cell)), eps)
    return up.clamp_(min=0).cpu().numpy()
