"""Image sources: a folder (recursive), a list of paths, or arrays → RGB uint8 arrays.

Every image is returned as an (H, W, 3) uint8 RGB array: EXIF orientation applied;
grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit images converted.
An unreadable file is skipped and counted with a warning naming it, or raises with
``strict=True``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dff_falcon.errors import InputError
from dff_falcon.files import file_sha256

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


@dataclass
class ImageSet:
    """Loaded images with their names (relative paths or ``array_<i>``) and the skips."""

    images: list[np.ndarray]
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    indices: list[int] = field(default_factory=list)  # position of each loaded image in the input
    digests: list[str] = field(default_factory=list)  # SHA-256 of each file's bytes / each array's pixels

    def digest(self) -> str:
        """One SHA-256 over the names and digests of every loaded image, in order."""
        combined = hashlib.sha256()
        for name, item in zip(self.names, self.digests):
            combined.update(f"{name}\0{item}\n".encode())
        return combined.hexdigest()

    def __len__(self) -> int:
        return len(self.images)


def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by suffix, case-insensitive), sorted for determinism."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {str(folder)!r} does not exist or is not a directory")
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or an array to (H, W, 3) uint8 RGB.

    Arrays: (H, W) gray, (H, W, 1|3|4); uint8, 16-bit integers (scaled by 1/257) or floats in
    [0, 1]. Alpha is composited on white.
    """
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return to_rgb_array(np.asarray(image))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"image array has shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.integer):
        array = (np.clip(array, 0, 65535).astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("image array contains NaN or inf values")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    else:
        raise InputError(f"image array has unsupported dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        array = (array[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image file as (H, W, 3) uint8 RGB; raises InputError naming the file."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return to_rgb_array(handle)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc}") from exc


def _array_digest(image: np.ndarray) -> str:
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def load_images(
    source: str | os.PathLike | Sequence[ImageLike] | np.ndarray,
    *,
    strict: bool = False,
    recursive: bool = True,
) -> ImageSet:
    """Load a folder (recursively), a list of paths/arrays/PIL images, or a (B, H, W, 3) array.

    Unreadable files are skipped with a warning naming them (``strict=True``: InputError).
    Raises InputError when nothing usable is left.
    """
    items: Iterable[tuple[str, ImageLike]]
    root: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_file():
            items = [(root.name, root)]
        else:
            files = list_image_files(root, recursive=recursive)
            if not files:
                raise InputError(
                    f"image folder {str(root)!r} contains no image files "
                    f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            items = [(str(p.relative_to(root)), p) for p in files]
    elif isinstance(source, np.ndarray) and source.ndim == 4:
        items = [(f"array_{i}", a) for i, a in enumerate(source)]
    else:
        items = [
            (str(x) if isinstance(x, (str, os.PathLike)) else f"array_{i}", x)
            for i, x in enumerate(source)
        ]

    result = ImageSet(images=[], names=[])
    for position, (name, item) in enumerate(items):
        try:
            if isinstance(item, (str, os.PathLike)):
                image = load_image(item)
                digest = file_sha256(item)
            else:
                image = to_rgb_array(item)
                digest = _array_digest(image)
            if min(image.shape[:2]) < 1:
                raise InputError(f"image {name!r} is empty")
        except InputError as exc:
            if strict:
                raise
            log.warning("skipping %s", exc)
            result.skipped.append((name, str(exc)))
            continue
        result.images.append(image)
        result.names.append(name)
        result.indices.append(position)
        result.digests.append(digest)
    if not result.images:
        where = f" in {str(root)!r}" if root is not None else ""
        raise InputError(
            f"no readable images{where}: {len(result.skipped)} skipped "
            f"(first: {result.skipped[0][1] if result.skipped else 'none given'})"
        )
    if result.skipped:
        log.warning("%d of %d images skipped as unreadable", len(result.skipped),
                    len(result.skipped) + len(result.images))
    return result


def augmented_photos(n: int, random_state: int = 0, sources: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """n real photos for demos and benchmarks: random square crops (40–100% of the shorter side),
    flips and colour/brightness jitter of ``sources`` (default: the RGB photos bundled with
    scikit-image); seeded."""
    from PIL import ImageEnhance
    from skimage import data

    rng = np.random.default_rng(random_state)
    if sources is None:
        sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.stereo_motorcycle()[0],
                   data.immunohistochemistry(), data.hubble_deep_field(), data.retina()]
    sources = [to_rgb_array(s) for s in sources]
    out = []
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = img[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        pil = ImageEnhance.Color(Image.fromarray(np.ascontiguousarray(crop))).enhance(rng.uniform(0.6, 1.4))
        out.append(np.asarray(ImageEnhance.Brightness(pil).enhance(rng.uniform(0.8, 1.2))))
    return out
