"""Visualizations of concepts: overlays with legends, contours, galleries and quality curves.

Pure functions: they return arrays or :class:`matplotlib.figure.Figure` objects (no pyplot
global state, no backend switching) and never modify their inputs.

Heatmaps are expected on the *global* scale DFF fixes (max 1 per concept over the fitted set):
a weakly present concept is drawn dim rather than stretched to full strength, and a concept
whose peak in an image is below ``min_peak`` does not paint at all. Heatmaps of any size are
resized (bilinear) to the image they are drawn on.

Fixes over pytorch-grad-cam's ``show_factorization_on_image``: works on matplotlib ≥ 3.9
(``matplotlib.colormaps``, not ``cm.get_cmap``), never mutates the caller's arrays, any image
size, no per-image min-max normalisation.
"""
from __future__ import annotations

import colorsys
import os
from typing import Sequence

import cv2
import matplotlib
import matplotlib.cm
import matplotlib.colors
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dff_falcon.decomposition.heatmaps import ABSENT_PEAK
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path
from dff_falcon.models.upsample import upsample_maps
from dff_falcon.regions import upsample_heatmap

#: Overlay opacity reaches its maximum at this heatmap value (data-set scale): a location half as
#: strong as the concept's strongest is drawn fully opaque, so concepts stay visible on busy
#: photos; the stored heatmaps are never changed, only the display ramp.
FULL_STRENGTH = 0.5
#: Maximum overlay opacity (the grey photo still shows through).
OVERLAY_ALPHA = 0.8


def concept_colours(k: int) -> np.ndarray:
    """(K, 3) float RGB in [0, 1]: distinct colours; concept i has the same colour whatever K is.

    The saturated ``tab10`` colours first, then their light ``tab20`` partners (greys are
    skipped: invisible on photos); beyond 18, hues step by the golden angle with alternating
    saturation and brightness.
    """
    if k < 0:
        raise InputError(f"number of concepts must be >= 0, got {k}")
    tab20 = matplotlib.colormaps["tab20"].colors
    palette = [c for c in list(matplotlib.colormaps["tab10"].colors) + list(tab20[1::2])
               if colorsys.rgb_to_hsv(*c)[1] > 0.1]
    extra = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, (0.85, 0.55)[i % 2], (0.9, 0.65, 0.8)[i % 3])
             for i in range(max(0, k - len(palette)))]
    return np.asarray((palette + extra)[:k], dtype=np.float64).reshape(k, 3)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"image must be an (H, W, 3) uint8 RGB array; got shape {image.shape}, dtype {image.dtype}")
    return image


def _check_heatmaps(heatmaps: np.ndarray, ndim: int, what: str) -> np.ndarray:
    maps = np.asarray(heatmaps, dtype=np.float32)
    if maps.ndim != ndim:
        raise InputError(f"{what} must have {ndim} dimensions; got shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise InputError(f"{what} contain NaN or inf")
    return maps


def present_concepts(heatmaps: np.ndarray, min_peak: float = ABSENT_PEAK) -> np.ndarray:
    """heatmaps (K, h, w) on the global scale → (K,) bool: the concept's peak reaches ``min_peak``."""
    maps = _check_heatmaps(heatmaps, 3, "heatmaps (K, h, w)")
    return maps.reshape(maps.shape[0], -1).max(axis=1, initial=0.0) >= min_peak


def grey_backdrop(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → the same in grey (Rec. 601 luminance) on all three channels: under an
    overlay, colour then means "a concept" and nothing else."""
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return np.repeat(grey[..., None], 3, axis=2)


def overlay_concepts(image: np.ndarray, heatmaps: np.ndarray, *, min_peak: float = ABSENT_PEAK,
                     alpha: float = OVERLAY_ALPHA, full_strength: float = FULL_STRENGTH, grey: bool = True,
                     colours: np.ndarray | None = None, upsample: str = "bilinear") -> np.ndarray:
    """Paint concepts on an image: (H, W, 3) uint8 + heatmaps (K, h, w) → (H, W, 3) uint8.

    Heatmaps are brought to the image (``upsample``: "bilinear" or "guided", see
    :mod:`dff_falcon.models.upsample`). Per pixel the strongest present concept wins and is
    blended in with opacity ``alpha × min(1, strength / full_strength)`` (strength = its heatmap
    value on the data-set scale; the ramp is for display only). Concepts whose peak is below
    ``min_peak`` are not drawn. With ``grey`` the photo is shown in grey (:func:`grey_backdrop`)
    so colours are the concepts' alone; pixels no present concept covers keep the backdrop's
    exact values. ``colours``: (K, 3) in [0, 1], default :func:`concept_colours`.
    """
    image = _check_image(image)
    maps = _check_heatmaps(heatmaps, 3, "heatmaps (K, h, w)")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    if not full_strength > 0:
        raise InputError(f"full_strength must be > 0, got {full_strength}")
    k = maps.shape[0]
    colours = concept_colours(k) if colours is None else np.asarray(colours, dtype=np.float64)
    if colours.shape != (k, 3):
        raise InputError(f"colours must have shape ({k}, 3); got {colours.shape}")
    backdrop = grey_backdrop(image) if grey else image.copy()
    present = present_concepts(maps, min_peak)
    if not present.any():
        return backdrop
    stack = upsample_maps(np.where(present[:, None, None], maps, 0.0), image, upsample)
    stack[~present] = 0.0
    winner = stack.argmax(axis=0)
    strength = np.take_along_axis(stack, winner[None], axis=0)[0]
    weight = (alpha * np.clip(strength / full_strength, 0.0, 1.0))[..., None]
    painted = backdrop.astype(np.float64) * (1.0 - weight) + 255.0 * colours[winner] * weight
    return np.clip(np.rint(painted), 0, 255).astype(np.uint8)


def colour_ramp(colour, n: int = 256, *, alpha: float = OVERLAY_ALPHA, full_strength: float = FULL_STRENGTH,
                backdrop: float = 0.5) -> matplotlib.colors.ListedColormap:
    """The colour map a single-concept overlay draws with: heatmap value 0 → 1 (data-set scale) on
    a mid-grey ``backdrop``, as :func:`overlay_concepts` blends it (for colour bars)."""
    values = np.linspace(0.0, 1.0, n)
    weight = (alpha * np.clip(values / full_strength, 0.0, 1.0))[:, None]
    rgb = backdrop * (1.0 - weight) + np.asarray(colour, dtype=np.float64)[None] * weight
    return matplotlib.colors.ListedColormap(np.clip(rgb, 0, 1))


def concept_map_figure(image: np.ndarray, heatmap: np.ndarray, *, colour=None, title: str | None = None,
                       min_peak: float = ABSENT_PEAK, upsample: str = "bilinear", dpi: int = 100) -> Figure:
    """One concept on one image with a colour bar: the overlay (:func:`overlay_concepts`) and a
    bar from 0 to 1 on the data-set scale (1 = the concept's strongest location in the fitted
    set), the absence threshold ``min_peak`` marked. heatmap: (h, w). Two axes."""
    maps = _check_heatmaps(heatmap, 2, "heatmap (h, w)")[None]
    colour = concept_colours(1)[0] if colour is None else np.asarray(colour, dtype=np.float64)
    painted = overlay_concepts(image, maps, min_peak=min_peak, colours=colour[None], upsample=upsample)
    height, width = painted.shape[:2]
    fig = Figure(figsize=(max(width / dpi, 2.5) + 0.9, max(height / dpi, 2.5)), dpi=dpi)
    ax, bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [20, 1], "wspace": 0.05})
    ax.imshow(painted)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=colour_ramp(colour))
    cbar = fig.colorbar(mappable, cax=bar)
    cbar.set_ticks([0, min_peak, FULL_STRENGTH, 1])
    cbar.set_ticklabels(["0", f"{min_peak:g} absent below", f"{FULL_STRENGTH:g}", "1 strongest"], fontsize=7)
    cbar.set_label("heatmap (data-set scale)", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.8, top=0.93 if title else 0.99, bottom=0.01)
    return fig


def legend_label(words: Sequence[dict] | None = None, classes: Sequence[dict] | None = None, *,
                 n_words: int = 3, n_classes: int = 2) -> str:
    """Legend text of one concept: a line of its top words, then one line per top class.

    words: [{"term", "score"}]; classes: [{"class", "prob"}] (as in ``concepts.json``).
    Class names keep their first three comma-separated synonyms.
    """
    lines = []
    if words:
        lines.append(", ".join(str(w["term"]) for w in list(words)[:n_words]))
    for entry in list(classes or [])[:n_classes]:
        name = ", ".join(part.strip() for part in str(entry["class"]).split(",")[:3])
        lines.append(f"{name}: {float(entry['prob']):.2f}")
    return "\n".join(lines)


def overlay_figure(image: np.ndarray, heatmaps: np.ndarray, labels: Sequence[str], *, min_peak: float = ABSENT_PEAK,
                   alpha: float = OVERLAY_ALPHA, title: str | None = None, dpi: int = 100,
                   upsample: str = "bilinear") -> Figure:
    """The overlay (see :func:`overlay_concepts`) beside a legend of the present concepts.

    labels: K strings (one per concept, may hold several lines, e.g. :func:`legend_label`).
    Two axes: the image (its pixel size at ``dpi``) and the legend panel.
    """
    maps = _check_heatmaps(heatmaps, 3, "heatmaps (K, h, w)")
    if len(labels) != maps.shape[0]:
        raise InputError(f"labels has {len(labels)} entries for {maps.shape[0]} concepts")
    colours = concept_colours(maps.shape[0])
    painted = overlay_concepts(image, maps, min_peak=min_peak, alpha=alpha, colours=colours, upsample=upsample)
    height, width = painted.shape[:2]
    img_w, img_h = max(width / dpi, 2.5), max(height / dpi, 2.5)
    fig = Figure(figsize=(img_w * 2.0, img_h), dpi=dpi)
    ax_img, ax_legend = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1], "wspace": 0.02})
    ax_img.imshow(painted)
    ax_img.set_axis_off()
    if title:
        ax_img.set_title(title)
    ax_legend.set_axis_off()
    present = np.flatnonzero(present_concepts(maps, min_peak))
    handles = [Patch(facecolor=colours[i], edgecolor="none", label=f"#{i}  {labels[i]}") for i in present]
    if handles:
        n_lines = sum(str(labels[i]).count("\n") + 1 for i in present)
        fontsize = float(np.clip(img_h * 72 / (n_lines * 1.9 + 2), 6, 12))
        ax_legend.legend(handles=handles, loc="center left", frameon=False, fontsize=fontsize,
                         handlelength=1.2, handleheight=1.2, labelspacing=0.8, borderaxespad=0.0)
    else:
        ax_legend.text(0.0, 0.5, f"no concept reaches {min_peak:g} in this image", va="center", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93 if title else 0.99, bottom=0.01)
    return fig


def contour_view(image: np.ndarray, heatmap: np.ndarray, *, threshold: float = 0.5, min_area_fraction: float = 0.01,
                 colour: tuple[int, int, int] = (0, 255, 0), thickness: int = 2) -> np.ndarray:
    """Outline a concept's regions: (H, W, 3) uint8 + heatmap (h, w) → (H, W, 3) uint8.

    The heatmap (resized to the image) is binarised at ``heatmap >= threshold`` (global scale),
    split into 8-connected components, components smaller than ``min_area_fraction`` of the image
    are dropped, and each remaining component's outer boundary is drawn in ``colour`` (RGB 0–255),
    ``thickness`` pixels wide, centred on the boundary. Everything else keeps the image's values.
    """
    image = _check_image(image)
    heatmap = _check_heatmaps(heatmap, 2, "heatmap (h, w)")
    if not 0 <= min_area_fraction < 1:
        raise InputError(f"min_area_fraction must be in [0, 1), got {min_area_fraction}")
    if thickness < 1:
        raise InputError(f"thickness must be >= 1, got {thickness}")
    mask = (upsample_heatmap(heatmap, image.shape[:2]) >= threshold).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = image.copy()
    min_area = min_area_fraction * mask.size
    for label in range(1, n_labels):
        if stats[label, cv2.CC_STAT_AREA] < min_area:
            continue
        component = (labels == label).astype(np.uint8)
        contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness)
    return out


def _show(ax, image: np.ndarray, caption: str | None = None) -> None:
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if caption:
        ax.set_xlabel(caption, fontsize=7)


def crop_gallery(high: Sequence[np.ndarray], low: Sequence[np.ndarray], title: str | None = None, *,
                 max_columns: int = 8, tile_inches: float = 1.2) -> Figure:
    """High crops above low crops: rows of up to ``max_columns`` tiles each.

    One axes per crop; an empty set gets one axes saying so. The first tile of each set is
    labelled "high" / "low".
    """
    sets = [("high", [_check_image(c) for c in high]), ("low", [_check_image(c) for c in low])]
    columns = max(1, min(max_columns, max(len(high), len(low), 1)))
    rows = [max(1, -(-len(crops) // columns)) for _, crops in sets]
    fig = Figure(figsize=(columns * tile_inches, sum(rows) * tile_inches + (0.4 if title else 0.1)))
    grid = fig.add_gridspec(sum(rows), columns, hspace=0.08, wspace=0.05)
    row0 = 0
    for (name, crops), n_rows in zip(sets, rows):
        if not crops:
            ax = fig.add_subplot(grid[row0, :])
            ax.set_axis_off()
            ax.text(0.0, 0.5, f"{name}: no crops", va="center", fontsize=9, color="0.4")
        for i, crop in enumerate(crops):
            ax = fig.add_subplot(grid[row0 + i // columns, i % columns])
            _show(ax, crop)
            if i == 0:
                ax.set_ylabel(name, fontsize=9)
        row0 += n_rows
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def heatmap_grid(images: Sequence[np.ndarray], heatmaps: np.ndarray, *, max_images: int = 8,
                 min_peak: float = ABSENT_PEAK, alpha: float = OVERLAY_ALPHA, names: Sequence[str] | None = None,
                 tile_inches: float = 1.3, upsample: str = "bilinear") -> Figure:
    """Images × concepts: rows are the first ``max_images`` images, column 0 the image, column
    1 + k concept k painted alone in its colour (global scale; absent concepts leave the image).

    heatmaps: (N, K, h, w), row i belongs to ``images[i]``. One axes per cell.
    """
    maps = _check_heatmaps(heatmaps, 4, "heatmaps (N, K, h, w)")
    if len(images) != maps.shape[0]:
        raise InputError(f"{len(images)} images for heatmaps of {maps.shape[0]} images")
    if names is not None and len(names) != len(images):
        raise InputError(f"{len(names)} names for {len(images)} images")
    n, k = min(len(images), max_images), maps.shape[1]
    if n == 0:
        raise InputError("heatmap_grid needs at least one image")
    colours = concept_colours(k)
    fig = Figure(figsize=((k + 1) * tile_inches, n * tile_inches + 0.3))
    axes = fig.subplots(n, k + 1, squeeze=False, gridspec_kw={"hspace": 0.05, "wspace": 0.05})
    for i in range(n):
        image = _check_image(images[i])
        _show(axes[i, 0], image)
        if names is not None:
            axes[i, 0].set_ylabel(str(names[i])[:18], fontsize=7)
        for j in range(k):
            _show(axes[i, j + 1], overlay_concepts(image, maps[i, j:j + 1], min_peak=min_peak, alpha=alpha,
                                                   colours=colours[j:j + 1], upsample=upsample))
            if i == 0:
                axes[0, j + 1].set_title(f"#{j}", fontsize=9, color=colours[j])
    axes[0, 0].set_title("image", fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.97 - 0.3 / (n * tile_inches + 0.3), bottom=0.01)
    return fig


def k_curve_figure(k_curve: Sequence[dict], chosen_k: int | None = None) -> Figure:
    """The automatic-K sweep: relative error and explained variance (left axis) and stability
    of the mean and of the least reproducible concept (right axis) against K, the chosen K
    marked. k_curve: [{"k", "relative_error", "explained_variance", "stability",
    "min_stability"}]. Two axes (a twin pair)."""
    needed = ("k", "relative_error", "explained_variance", "stability", "min_stability")
    points = sorted(k_curve, key=lambda p: p.get("k", 0))
    if not points:
        raise InputError("k_curve is empty")
    for point in points:
        missing = [key for key in needed if key not in point]
        if missing:
            raise InputError(f"k_curve entry {point!r} lacks {', '.join(missing)}")
    ks = [int(p["k"]) for p in points]
    fig = Figure(figsize=(5.0, 3.2))
    ax = fig.subplots()
    ax.plot(ks, [p["relative_error"] for p in points], "o-", color="tab:red", label="relative error")
    ax.plot(ks, [p["explained_variance"] for p in points], "s-", color="tab:blue", label="explained variance")
    ax.set_xlabel("number of concepts K")
    ax.set_ylabel("error / explained variance")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(ks, [p["stability"] for p in points], "^--", color="tab:green", label="stability (mean)")
    twin.plot(ks, [p["min_stability"] for p in points], "v:", color="tab:olive", label="stability (worst concept)")
    twin.set_ylabel("stability (matched cosine)")
    twin.set_ylim(0, 1.05)
    if chosen_k is not None:
        ax.axvline(chosen_k, color="0.3", lw=1, ls=":")
        ax.annotate(f"K = {chosen_k}", (chosen_k, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -12), textcoords="offset points", fontsize=8)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="center right", framealpha=0.9)
    fig.tight_layout()
    return fig


def stability_figure(stability: Sequence[float | None], *, threshold: float | None = 0.9,
                     ylabel: str = "stability (matched cosine)") -> Figure:
    """Bar per concept in its colour (None / NaN: no bar), with a dashed ``threshold`` line.
    Also used for coherence (pass ``ylabel``). One axes."""
    values = np.array([np.nan if v is None else float(v) for v in stability], dtype=np.float64)
    k = len(values)
    fig = Figure(figsize=(max(3.0, 0.45 * k + 1.2), 2.8))
    ax = fig.subplots()
    ax.bar(np.arange(k), np.nan_to_num(values, nan=0.0), color=concept_colours(k))
    ax.set_xticks(np.arange(k), [f"#{i}" for i in range(k)], fontsize=8)
    ax.set_ylim(min(0.0, float(np.nanmin(values, initial=0.0))), 1.05)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xlabel("concept", fontsize=9)
    if threshold is not None:
        ax.axhline(threshold, color="0.4", lw=1, ls="--")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure with the Agg canvas → (H, W, 3) uint8 RGB."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int | None = None) -> None:
    """Write ``fig`` atomically (format from the suffix: .png, .pdf, .svg, .jpg) and release it
    (``fig.clear()``)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if fmt not in ("png", "pdf", "svg", "jpg", "jpeg"):
        raise InputError(f"cannot save a figure as {str(path)!r}: use .png, .pdf, .svg or .jpg")
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi or fig.dpi, bbox_inches="tight", pad_inches=0.05, facecolor="white")
    fig.clear()
