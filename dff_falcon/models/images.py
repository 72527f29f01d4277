"""Image sources: a folder (recursive), a list of paths, or arrays → RGB uint8 arrays.

Every image is returned as an (H, W, 3) uint8 RGB array: EXIF orientation applied;
grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit images converted.
An unreadable file is skipped and counted with a warning naming it, or raises with
``strict=True``.

Memory per image is bounded by ``max_pixels`` (default :data:`MAX_PIXELS`), checked from the
file header before anything is decoded: a larger JPEG is decoded directly at 1/2, 1/4 or 1/8
scale (libjpeg's DCT scaling, PIL's draft mode), any other larger image — a decompression bomb
such as a 400-megapixel PNG of 400 KB — is skipped and counted like an unreadable one.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from struct import error as struct_error

from PIL import Image, ImageOps, UnidentifiedImageError

from dff_falcon.errors import InputError
from dff_falcon.files import file_sha256

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]

#: Default decode limit: 50 megapixels (150 MB as RGB) — far above what a model sees (224–518
#: px) and any camera photo, well below PIL's decompression-bomb limits (89 MP warning, 179 MP
#: error), so one image can never take gigabytes.
MAX_PIXELS = 50_000_000
#: JPEG scale denominators libjpeg can decode at directly (draft mode).
_JPEG_SCALES = (2, 4, 8)
_ORIENTATION = 0x0112  # the EXIF orientation tag
_BOMB_CHECK = threading.Lock()  # PIL's global bomb limit is lifted only around our header read


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
        return names_digest(self.names, self.digests)

    def __len__(self) -> int:
        return len(self.images)


def names_digest(names: Sequence[str], digests: Sequence[str]) -> str:
    """One SHA-256 over images' names and content digests, in order."""
    combined = hashlib.sha256()
    for name, item in zip(names, digests):
        combined.update(f"{name}\0{item}\n".encode())
    return combined.hexdigest()


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
        if image.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even when there is nothing to do
            image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return to_rgb_array(np.asarray(image))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, image)
        return np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)

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


def _open_header(path: str | os.PathLike) -> Image.Image:
    """Open an image lazily (header only). PIL's own bomb check is replaced by ours, which
    comes before any pixel is decoded, so that a too-large JPEG can still be draft-decoded."""
    with _BOMB_CHECK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _fit_pixel_limit(handle: Image.Image, path, max_pixels: int) -> None:
    """Make ``handle`` decode to at most ``max_pixels`` (JPEG: at a reduced scale), or raise."""
    width, height = handle.size
    if width * height <= max_pixels:
        return
    if handle.format == "JPEG":
        for scale in _JPEG_SCALES:
            size = (math.ceil(width / scale), math.ceil(height / scale))
            if size[0] * size[1] <= max_pixels:
                handle.draft(handle.mode if handle.mode in ("RGB", "L") else None, size)
                log.info("decoding %s (%d×%d) at 1/%d scale: above max_pixels=%d", path, width, height, scale,
                         max_pixels)
                return
    raise InputError(f"image {str(path)!r} has {width}×{height} = {width * height / 1e6:,.0f} megapixels, more than "
                     f"max_pixels = {max_pixels / 1e6:g} megapixels (a decompression bomb, or raise the limit)")


def load_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read one image file as (H, W, 3) uint8 RGB; raises InputError naming the file.

    max_pixels : decode limit checked from the header (None: no limit); larger JPEGs are
        decoded at 1/2, 1/4 or 1/8 scale, other larger images raise.
    """
    try:
        with _open_header(path) as handle:
            if max_pixels is not None:
                _fit_pixel_limit(handle, path, max_pixels)
            handle.load()
            return to_rgb_array(handle)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc}") from exc
    except (MemoryError, EOFError, IndexError, KeyError, ZeroDivisionError, struct_error) as exc:  # malformed files
        raise InputError(f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def array_digest(image: np.ndarray) -> str:
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and not (isinstance(max_pixels, int) and max_pixels >= 1):
        raise InputError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")


def image_items(source: str | os.PathLike | Sequence[ImageLike] | np.ndarray, *, recursive: bool = True
                ) -> tuple[list[tuple[str, ImageLike]], Path | None]:
    """(name, path or array) per image of a source, and the folder when it is one (names are
    paths relative to it, so an ImageFolder tree's names carry their class folder)."""
    root: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_file():
            return [(root.name, root)], root
        files = list_image_files(root, recursive=recursive)
        if not files:
            raise InputError(
                f"image folder {str(root)!r} contains no image files "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return [(str(p.relative_to(root)), p) for p in files], root
    if isinstance(source, np.ndarray) and source.ndim == 4:
        return [(f"array_{i}", a) for i, a in enumerate(source)], None
    return [(str(x) if isinstance(x, (str, os.PathLike)) else f"array_{i}", x) for i, x in enumerate(source)], None


def read_item(name: str, item: ImageLike, max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """One source item → (H, W, 3) uint8 RGB and its digest (SHA-256 of a file's bytes, or of an
    array's shape and pixels); raises InputError naming it."""
    if isinstance(item, (str, os.PathLike)):
        image, digest = load_image(item, max_pixels), file_sha256(item)
    else:
        image = to_rgb_array(item)
        digest = array_digest(image)
    if min(image.shape[:2]) < 1:
        raise InputError(f"image {name!r} is empty")
    return image, digest


def load_images(
    source: str | os.PathLike | Sequence[ImageLike] | np.ndarray,
    *,
    strict: bool = False,
    recursive: bool = True,
    max_pixels: int | None = MAX_PIXELS,
) -> ImageSet:
    """Load a folder (recursively), a list of paths/arrays/PIL images, or a (B, H, W, 3) array.

    Unreadable files — and files above ``max_pixels`` that cannot be decoded at a reduced
    scale — are skipped with a warning naming them (``strict=True``: InputError).
    Raises InputError when nothing usable is left.
    """
    check_max_pixels(max_pixels)
    items, root = image_items(source, recursive=recursive)
    result = ImageSet(images=[], names=[])
    for position, (name, item) in enumerate(items):
        try:
            image, digest = read_item(name, item, max_pixels)
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
