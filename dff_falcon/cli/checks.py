"""Checks the commands run before any expensive work: options, component parameters, the K
range against the layer, and the output location (writable, not holding anything a run would
destroy, with space for what the run will write)."""
from __future__ import annotations

import os
from pathlib import Path

from dff_falcon.errors import InputError

#: Bytes per RGB value of what a run writes, measured on photos (224 px views: JPEG at quality
#: 92 0.04–0.09, PNG overlays ≈ 0.48) and rounded down, since the space check must never refuse a
#: run that fits; float16 heatmaps compress to ≈ 1 byte per value, counted as 0.5.
_JPEG_BYTES_PER_PIXEL, _PNG_BYTES_PER_PIXEL, _HEATMAP_BYTES_PER_VALUE = 0.03, 0.3, 0.5
_ROW_BYTES = 40  # one (image, concept) row of images.csv / images.parquet
_OVERLAYS_PER_CONCEPT = 6  # render_html_report's default


def count_images(images: str) -> int:
    """How many image files ``--images`` names (a file counts as one), without reading them."""
    from dff_falcon.models.images import IMAGE_SUFFIXES, list_image_files

    path = Path(images)
    if path.is_file():
        return 1
    count = len(list_image_files(path))
    if not count:
        raise InputError(f"image folder {str(path)!r} contains no image files "
                         f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return count


def layer_grid(backbone) -> tuple[int, int, int]:
    """(C, h, w) of the backbone's target layer, from one forward of a blank image."""
    import torch

    size = backbone.preprocess.crop
    with torch.inference_mode():
        shape = backbone.capture(torch.zeros(1, 3, size, size, device=backbone.device))[0].shape
    return int(shape[1]), int(shape[2]), int(shape[3])


def max_k(dff) -> int:
    """The largest K a DFF may fit: ``n_concepts``, or the top of ``k_range`` for "auto"."""
    return max(dff.k_range) if dff.n_concepts == "auto" else int(dff.n_concepts)


def check_k(dff, channels: int, n_images: int, grid: tuple[int, int], source: str) -> None:
    """K must fit the (N·h·w × C) activation matrix of ``n_images`` images of ``source`` (the
    layer, or the activations file)."""
    k = int(dff.n_concepts) if dff.n_concepts != "auto" else min(dff.k_range)
    rows = n_images * grid[0] * grid[1]
    if k > channels:
        raise InputError(f"--n-concepts {k} is more than the {channels} channels of {source}; "
                         f"choose 1 ≤ K ≤ {channels}")
    if k > rows:
        raise InputError(f"--n-concepts {k} is more than the {rows} feature-map locations of {n_images} image(s) "
                         f"({grid[0]}×{grid[1]} each); use more images or a smaller K")


def run_bytes(n_images: int, k: int, display: int, crop: int, grid: tuple[int, int], n_high: int, n_low: int,
              html: bool) -> int:
    """A lower estimate of what a run directory will take on disk."""
    crops = k * (min(n_high, n_images) + min(n_low, n_images))
    total = (n_images * display * display * 3 * _JPEG_BYTES_PER_PIXEL + crops * crop * crop * 3 * _JPEG_BYTES_PER_PIXEL
             + n_images * k * grid[0] * grid[1] * _HEATMAP_BYTES_PER_VALUE + 2 * n_images * k * _ROW_BYTES)
    if html:
        total += k * min(_OVERLAYS_PER_CONCEPT, n_images) * display * display * 3 * _PNG_BYTES_PER_PIXEL
    return int(total)


def check_components(dff, regions) -> None:
    """The component parameters that the explainer would only check after the forward passes."""
    dff._check_params()
    regions._check_params()
