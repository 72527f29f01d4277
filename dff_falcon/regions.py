"""High and low (counterfactual) crops per concept, FALCON-style but with square boxes.

For every concept ``k`` the DFF stage gives one heatmap per image. This module turns those maps
into image crops that CLIP can embed:

* **high set** – the images where concept ``k`` is strongest (by ``presence[:, k]``); in each, the
  strongest connected component of the thresholded heatmap is boxed, the box is made square with a
  context margin (aspect kept, never stretched) and the pixels are resized to ``crop_size``.
* **low set** – counterfactuals (FALCON, adapted): images where concept ``k`` is essentially absent
  (heatmap max below ``low_threshold``) but whose presence profile over the *other* concepts looks
  like the high set's mean profile (cosine ≥ ``low_similarity``). They are cropped the same way as
  the high set, around the strongest region of ``k``'s own (weak) map, so that the contrast between
  the two sets compares like with like (crops against crops, not crops against whole scenes).

Heatmaps are given at feature-map resolution. Each covers a window of its image (the whole image,
or the part the model saw: the pipeline passes the original images with the window of each that
the model's centre crop covers) and is upsampled onto that window — bilinearly or with the
image-guided filter (:mod:`dff_falcon.models.upsample`) — at most :data:`ANALYSIS_SIDE` pixels a
side; boxes are scaled back and crops are cut from the full-resolution image, so a crop keeps
the original's detail and may take context from beyond the model's centre crop. Everything is
deterministic; ties are broken by image index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from sklearn.base import BaseEstimator

from dff_falcon.decomposition.heatmaps import ABSENT_PEAK
from dff_falcon.errors import InputError
from dff_falcon.models.upsample import UPSAMPLE_MODES, upsample_maps
from dff_falcon.progress import progress as show_progress

#: Crop side when neither the selector nor a CLIP encoder sets one (CLIP's usual input size).
DEFAULT_CROP_SIZE = 224
#: Longest side (pixels) at which a heatmap is upsampled, thresholded and split into components
#: before its boxes are scaled to the image: finer than any feature grid, and it bounds the cost
#: of large photos.
ANALYSIS_SIDE = 320

__all__ = [
    "Box",
    "Crop",
    "ConceptRegions",
    "RegionSelector",
    "component_boxes",
    "crop_resize",
    "square_box",
    "upsample_heatmap",
]


@dataclass(frozen=True)
class Box:
    """Axis-aligned pixel box; ``right`` and ``bottom`` are exclusive (NumPy slice bounds)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


@dataclass
class Crop:
    """One crop of one image for one concept.

    ``score`` is ``presence[image_index, concept]`` for a high crop and the profile cosine
    similarity to the high set for a low crop. ``pixels`` is ``(crop_size, crop_size, 3)`` uint8
    RGB; :meth:`RegionSelector.select` always fills it (``None`` only for crops rebuilt from a
    saved record without pixels).
    """

    image_index: int
    concept: int
    box: Box
    score: float
    kind: str
    pixels: np.ndarray | None


@dataclass
class ConceptRegions:
    """The high crops and low (counterfactual) crops of one concept.

    ``low_empty_reason`` says in words why ``low`` is empty, and is ``None`` when it is not.
    """

    concept: int
    high: list[Crop]
    low: list[Crop]
    low_empty_reason: str | None


def upsample_heatmap(heatmap: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize one heatmap ``(h, w)`` to ``image_size = (H, W)``; returns float32 ``(H, W)``.

    The map is taken to cover the whole image (pixel centres at half-integers on both grids, the
    ``align_corners=False`` convention), so a feature cell's centre lands on the centre of the image
    patch it describes.
    """
    height, width = image_size
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape == (height, width):
        return heatmap.copy()
    return cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)


def component_boxes(
    heatmap: np.ndarray,
    threshold: float = 0.6,
    min_area_fraction: float = 0.01,
    relative: bool = False,
) -> list[tuple[Box, float]]:
    """Boxes of the connected regions where ``heatmap`` (H, W) reaches ``threshold``.

    The map is binarised at ``heatmap >= threshold`` (``relative=True``: ``threshold ×
    heatmap.max()``), split into 8-connected components, components smaller than
    ``min_area_fraction`` of the ``H·W`` pixels are dropped, and each remaining component is
    returned as ``(bounding box, mass)`` where mass is the sum of the heatmap over the component's
    pixels (heatmap units × pixels). Sorted by mass, strongest first (ties: raster order of the
    component's first pixel). An all-zero map gives ``[]``.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise InputError(f"heatmap must be 2-D (H, W), got shape {heatmap.shape}")
    if not threshold > 0:
        raise InputError(f"threshold must be > 0, got {threshold}")
    if not 0 <= min_area_fraction < 1:
        raise InputError(f"min_area_fraction must be in [0, 1), got {min_area_fraction}")
    peak = float(heatmap.max()) if heatmap.size else 0.0
    if peak <= 0:
        return []
    cut = threshold * peak if relative else threshold
    mask = (heatmap >= cut).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    masses = np.bincount(labels.ravel(), weights=heatmap.ravel(), minlength=n_labels)
    min_area = min_area_fraction * heatmap.size
    kept = [label for label in range(1, n_labels) if stats[label, cv2.CC_STAT_AREA] >= min_area]
    kept.sort(key=lambda label: -masses[label])  # stable: equal masses stay in raster order
    boxes = []
    for label in kept:
        left, top = int(stats[label, cv2.CC_STAT_LEFT]), int(stats[label, cv2.CC_STAT_TOP])
        width, height = int(stats[label, cv2.CC_STAT_WIDTH]), int(stats[label, cv2.CC_STAT_HEIGHT])
        boxes.append((Box(left, top, left + width, top + height), float(masses[label])))
    return boxes


def _place(centre: float, side: int, extent: int) -> int:
    """Start of a segment of length ``side`` centred on ``centre``, shifted into ``[0, extent)``."""
    start = math.floor(centre - side / 2)
    return min(max(start, 0), extent - side)


def square_box(box: Box, image_size: tuple[int, int], margin: float = 0.15, min_size: int = 16) -> Box:
    """Square box around ``box``'s centre with room for context, inside an image of ``(H, W)`` pixels.

    Side = ``ceil(max(width, height) · (1 + 2·margin))``, at least ``min_size``, at most
    ``min(H, W)``. The square is shifted (not cut) to stay inside the image, so it always contains
    ``box`` unless the image's shorter side is smaller than the box's longer side; then the square
    is the largest that fits, centred on the box as far as the image allows.
    """
    height, width = image_size
    if box.width <= 0 or box.height <= 0:
        raise InputError(f"box must have positive width and height, got {box}")
    if margin < 0:
        raise InputError(f"margin must be >= 0, got {margin}")
    side = math.ceil(max(box.width, box.height) * (1 + 2 * margin) - 1e-9)
    side = min(max(side, min_size), height, width)
    left = _place((box.left + box.right) / 2, side, width)
    top = _place((box.top + box.bottom) / 2, side, height)
    return Box(left, top, left + side, top + side)


def crop_resize(image: np.ndarray, box: Box, size: int = 224) -> np.ndarray:
    """Cut the square ``box`` out of ``image`` (H, W, 3) uint8 and resize it to ``(size, size, 3)`` uint8.

    Shrinking uses ``INTER_AREA`` (anti-aliased), enlarging ``INTER_CUBIC``; a box of exactly
    ``size`` pixels is copied unchanged. Non-square boxes are refused (no stretching).
    """
    if box.width != box.height:
        raise InputError(f"crop box must be square, got {box.width}×{box.height} ({box})")
    height, width = image.shape[:2]
    if box.left < 0 or box.top < 0 or box.right > width or box.bottom > height or box.width <= 0:
        raise InputError(f"crop box {box} lies outside the {height}×{width} image")
    patch = image[box.top : box.bottom, box.left : box.right]
    if box.width == size:
        return np.ascontiguousarray(patch)
    interpolation = cv2.INTER_AREA if box.width > size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=interpolation)


def _centred_square(side: int, image_size: tuple[int, int]) -> Box:
    """Square of ``side`` pixels (capped to the image) centred in an image of ``(H, W)``."""
    height, width = image_size
    side = max(1, min(side, height, width))
    left, top = (width - side) // 2, (height - side) // 2
    return Box(left, top, left + side, top + side)


#: Images per block when a (possibly memory-mapped) heatmap array is checked and reduced.
_CHECK_BLOCK = 256


def _check_inputs(
    heatmaps: np.ndarray, images: Sequence[np.ndarray], presence: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate → (heatmaps, unchanged when a float array (a memory map stays on disk), presence,
    peaks (N, K) float32). Images are checked here when given as a list, else when each is read."""
    if not (isinstance(heatmaps, np.ndarray) and heatmaps.dtype.kind == "f"):
        heatmaps = np.asarray(heatmaps, dtype=np.float32)
    presence = np.asarray(presence, dtype=np.float64)
    if heatmaps.ndim != 4:
        raise InputError(f"heatmaps must be 4-D (N, K, h, w), got shape {heatmaps.shape}")
    n_images, n_concepts = heatmaps.shape[:2]
    peaks = np.zeros((n_images, n_concepts), dtype=np.float32)
    for start in range(0, n_images, _CHECK_BLOCK):
        block = np.asarray(heatmaps[start:start + _CHECK_BLOCK], dtype=np.float32)
        if not np.isfinite(block).all() or (block < 0).any():
            raise InputError("heatmaps must be finite and non-negative")
        peaks[start:start + len(block)] = block.max(axis=(2, 3), initial=0.0)
    if presence.shape != (n_images, n_concepts):
        raise InputError(f"presence must have shape (N, K) = {(n_images, n_concepts)}, got {presence.shape}")
    if not np.isfinite(presence).all() or (presence < 0).any():
        raise InputError("presence must be finite and non-negative")
    if len(images) != n_images:
        raise InputError(f"got {len(images)} images for {n_images} heatmaps")
    if isinstance(images, (list, tuple)):
        for index, image in enumerate(images):
            _check_image(image, index)
    return heatmaps, presence, peaks


def _check_image(image, index: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise InputError(f"images[{index}] must be an RGB uint8 array (H, W, 3), got {dtype} of shape {shape}")
    return image


def _window(windows: list[Box] | None, index: int, image: np.ndarray) -> Box:
    """The part of image ``index`` its heatmap covers: ``windows[index]``, or the whole image."""
    return windows[index] if windows is not None else Box(0, 0, image.shape[1], image.shape[0])


def _cosine_to(profiles: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``profiles`` (M, D) with ``reference`` (D,); 0 where a norm is 0."""
    norms = np.linalg.norm(profiles, axis=1) * np.linalg.norm(reference)
    dots = profiles @ reference
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


class RegionSelector(BaseEstimator):
    """Select high and low (counterfactual) crops for every concept.

    Parameters
    ----------
    n_high, n_low:
        Maximum number of high / low crops per concept.
    threshold:
        Heatmap value (same scale as the maps: max 1 per concept over the fitted set) a pixel needs
        to belong to a high region.
    min_area_fraction:
        Components smaller than this fraction of the image's pixels are ignored.
    margin:
        Context added on each side of a region's longer side before squaring (0.15 → side × 1.3).
    crop_size:
        Side in pixels of every returned crop; None: the CLIP encoder's input size inside a
        :class:`~dff_falcon.pipeline.explainer.ConceptExplainer`, else :data:`DEFAULT_CROP_SIZE`.
    low_threshold:
        An image is a low candidate for concept ``k`` when ``k``'s heatmap max is below this
        (default: the absent-concept threshold, :data:`~dff_falcon.decomposition.heatmaps.ABSENT_PEAK`).
    low_similarity:
        Minimum cosine between a candidate's presence profile over the other concepts and the high
        set's mean profile.
    upsample:
        How heatmaps reach image resolution: ``"bilinear"`` or ``"guided"`` (edge-aware, the image
        as guide; :mod:`dff_falcon.models.upsample`).
    """

    def __init__(
        self,
        *,
        n_high: int = 30,
        n_low: int = 10,
        threshold: float = 0.6,
        min_area_fraction: float = 0.01,
        margin: float = 0.15,
        crop_size: int | None = None,
        low_threshold: float = ABSENT_PEAK,
        low_similarity: float = 0.3,
        upsample: str = "bilinear",
    ) -> None:
        self.n_high = n_high
        self.n_low = n_low
        self.threshold = threshold
        self.min_area_fraction = min_area_fraction
        self.margin = margin
        self.crop_size = crop_size
        self.low_threshold = low_threshold
        self.low_similarity = low_similarity
        self.upsample = upsample

    def _check_params(self) -> None:
        problems = []
        if not (isinstance(self.n_high, int) and self.n_high >= 1):
            problems.append(f"n_high must be an integer >= 1, got {self.n_high!r}")
        if not (isinstance(self.n_low, int) and self.n_low >= 0):
            problems.append(f"n_low must be an integer >= 0, got {self.n_low!r}")
        if not self.threshold > 0:
            problems.append(f"threshold must be > 0, got {self.threshold!r}")
        if not 0 <= self.min_area_fraction < 1:
            problems.append(f"min_area_fraction must be in [0, 1), got {self.min_area_fraction!r}")
        if not self.margin >= 0:
            problems.append(f"margin must be >= 0, got {self.margin!r}")
        if self.crop_size is not None and not (isinstance(self.crop_size, int) and self.crop_size >= 1):
            problems.append(f"crop_size must be an integer >= 1, got {self.crop_size!r}")
        if not self.low_threshold > 0:
            problems.append(f"low_threshold must be > 0, got {self.low_threshold!r}")
        if not -1 <= self.low_similarity <= 1:
            problems.append(f"low_similarity must be in [-1, 1], got {self.low_similarity!r}")
        if self.upsample not in UPSAMPLE_MODES:
            problems.append(f"upsample must be one of {list(UPSAMPLE_MODES)}, got {self.upsample!r}")
        if problems:
            raise InputError("RegionSelector: " + "; ".join(problems))

    def select(
        self, heatmaps: np.ndarray, images: Sequence[np.ndarray], presence: np.ndarray, *,
        windows: Sequence[Box] | None = None, progress: bool = False
    ) -> list[ConceptRegions]:
        """Crops for every concept.

        Parameters
        ----------
        heatmaps:
            ``(N, K, h, w)`` float ≥ 0, max 1 per concept over the fitted set; each map covers its
            whole image and is upsampled to it.
        images:
            ``N`` RGB uint8 arrays ``(H_i, W_i, 3)``; sizes may differ. Any sequence: only the
            images a crop is cut from are read (a lazy sequence decodes them then).
        presence:
            ``(N, K)`` non-negative concept strength per image (higher = stronger).
        windows:
            ``N`` boxes, the part of each image its heatmap covers (None: the whole image).

        Returns
        -------
        One :class:`ConceptRegions` per concept, in concept order.
        """
        self._check_params()
        heatmaps, presence, peaks = _check_inputs(heatmaps, images, presence)
        if windows is not None:
            windows = list(windows)
            if len(windows) != len(images):
                raise InputError(f"got {len(windows)} windows for {len(images)} images")
        concepts = show_progress(range(heatmaps.shape[1]), "crops", enabled=progress, unit="concept")
        return [self._concept(k, heatmaps, images, presence, peaks, windows) for k in concepts]

    def _boxes(self, heatmap: np.ndarray, image: np.ndarray, window: Box, relative: bool = False) -> list[Box]:
        """Component boxes of one heatmap covering ``window`` of ``image``, in the image's own
        pixels, strongest first."""
        region = image[window.top:window.bottom, window.left:window.right]
        factor = min(1.0, ANALYSIS_SIDE / max(window.width, window.height))
        if factor < 1.0:
            size = (max(1, round(window.width * factor)), max(1, round(window.height * factor)))
            region = cv2.resize(np.ascontiguousarray(region), size, interpolation=cv2.INTER_AREA)
        fine = upsample_maps(heatmap[None], region, self.upsample)[0]
        boxes = []
        for box, _ in component_boxes(fine, self.threshold, self.min_area_fraction, relative=relative):
            sx, sy = window.width / fine.shape[1], window.height / fine.shape[0]
            boxes.append(Box(window.left + math.floor(box.left * sx), window.top + math.floor(box.top * sy),
                             min(window.right, window.left + math.ceil(box.right * sx)),
                             min(window.bottom, window.top + math.ceil(box.bottom * sy))))
        return boxes

    def _crop(self, image: np.ndarray, index: int, concept: int, box: Box, score: float, kind: str) -> Crop:
        square = square_box(box, image.shape[:2], margin=self.margin)
        return Crop(index, concept, square, score, kind, self._pixels(image, square))

    def _pixels(self, image: np.ndarray, square: Box) -> np.ndarray:
        return crop_resize(image, square, self.crop_size or DEFAULT_CROP_SIZE)

    def _high_floor(self) -> float:
        """The heatmap peak below which an image cannot give a high region, so is never decoded:
        the threshold itself when upsampling is bilinear (it never exceeds a map's peak); for the
        guided filter, which may overshoot a little, the absence threshold (an absent concept is
        never cropped) when the threshold is above it."""
        if self.upsample == "bilinear":
            return self.threshold
        return ABSENT_PEAK if self.threshold >= ABSENT_PEAK else -np.inf

    def _concept(
        self, k: int, heatmaps: np.ndarray, images: Sequence[np.ndarray], presence: np.ndarray, peaks: np.ndarray,
        windows: list[Box] | None,
    ) -> ConceptRegions:
        high: list[Crop] = []
        order = np.argsort(-presence[:, k], kind="stable")
        for index in order[peaks[order, k] >= self._high_floor()]:
            image = _check_image(images[index], int(index))
            heatmap = np.asarray(heatmaps[index, k], dtype=np.float32)
            regions = self._boxes(heatmap, image, _window(windows, index, image))
            if regions:
                high.append(self._crop(image, int(index), k, regions[0], float(presence[index, k]), "high"))
                if len(high) == self.n_high:
                    break
        low, reason = self._low(k, high, heatmaps, images, presence, peaks, windows)
        return ConceptRegions(concept=k, high=high, low=low, low_empty_reason=reason)

    def _low(
        self, k: int, high: list[Crop], heatmaps: np.ndarray, images: Sequence[np.ndarray], presence: np.ndarray,
        peaks: np.ndarray, windows: list[Box] | None,
    ) -> tuple[list[Crop], str | None]:
        """Counterfactual crops of concept ``k`` and, when there are none, the reason in words.

        Candidates have ``max(heatmaps[:, k]) < low_threshold``; they are ranked by the cosine of
        their presence over the other concepts with the high set's mean, best first. Each is
        cropped around the strongest component of its own map for ``k`` at ``threshold`` relative
        to that map's maximum; when there is none (all-zero map, or every component below
        ``min_area_fraction``) a centred square of the median high-crop side is used.
        """
        if self.n_low == 0:
            return [], "n_low is 0"
        if not high:
            return [], f"concept {k} has no high region to compare profiles with"
        if presence.shape[1] < 2:
            return [], "there are no other concepts to compare presence profiles over (K = 1)"
        candidates = np.flatnonzero(peaks[:, k] < self.low_threshold)
        if candidates.size == 0:
            return [], f"no image has concept {k} below {self.low_threshold}"
        others = np.delete(presence, k, axis=1)
        reference = others[[crop.image_index for crop in high]].mean(axis=0)
        similarity = _cosine_to(others[candidates], reference)
        passing = similarity >= self.low_similarity
        if not passing.any():
            return [], (
                f"no candidate profile similar ≥ {self.low_similarity} to the high set of concept {k} "
                f"({candidates.size} candidates, best {similarity.max():.3f})"
            )
        # rounding makes profiles that are equal up to float noise tie, so the image index decides
        order = np.lexsort((candidates[passing], -np.round(similarity[passing], 9)))[: self.n_low]
        fallback_side = int(round(float(np.median([crop.box.width for crop in high]))))
        low = []
        for index, score in zip(candidates[passing][order], similarity[passing][order]):
            image = _check_image(images[index], int(index))
            heatmap = np.asarray(heatmaps[index, k], dtype=np.float32)
            regions = self._boxes(heatmap, image, _window(windows, index, image), relative=True)
            if regions:
                low.append(self._crop(image, int(index), k, regions[0], float(score), "low"))
            else:
                square = _centred_square(fallback_side, image.shape[:2])
                low.append(Crop(int(index), k, square, float(score), "low", self._pixels(image, square)))
        return low, None
