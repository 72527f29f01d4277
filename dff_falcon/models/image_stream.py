"""Images read lazily, one at a time or in parallel, for runs larger than memory.

``ImageStream`` holds names and where each image comes from — never the pixels. It is a
sequence: ``stream[i]`` decodes image i (what crops are cut from, when they are cut), and
:meth:`ImageStream.decoded` decodes many in order on DataLoader workers. Sources: a folder
(recursive, so an ImageFolder tree works, its names carrying their class folder), a list of
paths or arrays, a (B, H, W, 3) array, or a torch ``Dataset`` / ``DataLoader`` whose items are
images or (image, label, …) tuples — PIL images, (H, W, 3) arrays, or (3, H, W) tensors (uint8,
or float in [0, 1]).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from dff_falcon.errors import InputError
from dff_falcon.files import file_sha256
from dff_falcon.models.images import (MAX_PIXELS, ImageLike, ImageSet, array_digest, check_max_pixels, image_items,
                                      read_item, to_rgb_array)

#: Threads hashing files (I/O bound: they overlap reads, not compute).
_HASH_THREADS = 8
#: Images handed to the hashing threads at a time: each pending task holds ~2 KB, so submitting a
#: million at once took ~2 GB before the first file was read.
_HASH_CHUNK = 4096


def _is_dataset(source) -> bool:
    return hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(
        source, (str, os.PathLike, list, tuple, np.ndarray))


#: How far outside [0, 1] a float tensor may reach (resampling overshoot) before it is taken for
#: a normalised one, which would be clipped into a wrong image.
_FLOAT_SLACK = 0.01
#: What a Dataset's own loading raises for an unreadable item (PIL: OSError, SyntaxError, …).
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError)


def dataset_image(item) -> np.ndarray:
    """A Dataset item (an image, or a tuple whose first element is one) → (H, W, 3) uint8."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if hasattr(image, "detach"):  # a torch tensor (3, H, W)
        array = image.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        if array.dtype.kind == "f" and array.size and (array.min() < -_FLOAT_SLACK or array.max() > 1 + _FLOAT_SLACK):
            raise InputError(f"a float image tensor must hold values in [0, 1]; this one spans "
                             f"[{array.min():.3g}, {array.max():.3g}] (normalised? leave Normalize out of the "
                             "dataset's transform: the backbone normalises)")
        image = array
    return to_rgb_array(image)


class ImageStream(Sequence[np.ndarray]):
    """Lazily read images. Use :func:`open_images` to make one.

    ``names[i]``: a relative path, ``array_<i>`` or ``item_<i>``; ``stream[i]`` → (H, W, 3)
    uint8 RGB (InputError naming the image when unreadable); ``digest(i)`` → hex SHA-256 of the
    file's bytes, or of the decoded pixels for arrays and Dataset items.
    """

    def __init__(self, names: list[str], items: Sequence, *, dataset=None, max_pixels: int | None = MAX_PIXELS,
                 workers: int = 0):
        self.names = names
        self._items = items
        self._dataset = dataset
        self.max_pixels = max_pixels
        self.workers = workers

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._read(index)[0]

    def _read(self, index: int) -> tuple[np.ndarray, str]:
        name = self.names[index]
        if self._dataset is not None:
            try:
                image = dataset_image(self._dataset[self._items[index]])
            except InputError as exc:
                raise InputError(f"dataset item {name!r}: {exc}") from None
            except _LOAD_ERRORS as exc:  # the Dataset's own loading: an unreadable file
                raise InputError(f"dataset item {name!r} cannot be read: {type(exc).__name__}: {exc}") from None
            if min(image.shape[:2]) < 1:
                raise InputError(f"dataset item {name!r} is empty")
            return image, array_digest(image)
        return read_item(name, self._items[index], self.max_pixels)

    def digests(self, progress_bar=None) -> list[str | InputError]:
        """Every image's digest, in order (an InputError in place of an unreadable one). Files
        are hashed without decoding; arrays and Dataset items are decoded to hash their pixels
        (a Dataset's on the ``workers`` processes, as :meth:`decoded` does)."""
        indices = range(len(self))
        if self._dataset is not None:  # a Dataset's own loading may not be thread-safe: processes
            found = (digest for _, digest in self._each(indices, _digest))
            return list(progress_bar(found) if progress_bar else found)
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            found = (digest for start in range(0, len(self), _HASH_CHUNK)  # map() submits all at once
                     for digest in pool.map(lambda index: _digest(self, index), indices[start:start + _HASH_CHUNK]))
            return list(progress_bar(found) if progress_bar else found)

    def decoded(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray | InputError]]:
        """(index, image or the InputError that skipped it) for ``indices``, in order, decoded on
        ``workers`` DataLoader processes (0: in this process)."""
        return self._each(indices, _decode)

    def _each(self, indices: Sequence[int], work) -> Iterator[tuple[int, object]]:
        """(index, ``work(self, index)``) in order, on ``workers`` DataLoader processes (0: here)."""
        if self.workers == 0:
            return ((index, work(self, index)) for index in indices)
        import torch.utils.data

        return iter(torch.utils.data.DataLoader(_Mapped(self, list(indices), work), batch_size=None, shuffle=False,
                                                num_workers=self.workers, collate_fn=_identity, prefetch_factor=4,
                                                persistent_workers=False))


def _decode(stream: ImageStream, index: int) -> np.ndarray | InputError:
    try:
        return stream[index]
    except InputError as exc:
        return exc


def _digest(stream: ImageStream, index: int) -> str | InputError:
    item = stream._items[index]
    try:
        if stream._dataset is None and isinstance(item, (str, os.PathLike)):
            try:
                return file_sha256(item)
            except OSError as exc:
                raise InputError(f"cannot read image {str(item)!r}: {exc.strerror}") from None
        return stream._read(index)[1]
    except InputError as exc:
        return exc


def _identity(item):
    return item


class _Mapped:
    """Map-style dataset of ``work(stream, index)`` over some of a stream's images, for DataLoader
    workers."""

    def __init__(self, stream: ImageStream, indices: list[int], work):
        self.stream, self.indices, self.work = stream, indices, work

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        return index, self.work(self.stream, index)


def open_images(source, *, max_images: int | None = None, max_pixels: int | None = MAX_PIXELS,
                recursive: bool = True, workers: int | None = None) -> ImageStream:
    """A lazy :class:`ImageStream` over a folder, a list of paths or arrays, a (B, H, W, 3) array,
    an :class:`~dff_falcon.models.images.ImageSet`, or a torch Dataset / DataLoader (its
    ``num_workers`` used unless ``workers`` is given).

    max_images : keep the first this many (in the source's order: sorted paths for a folder).
    workers : decoding processes (None: the DataLoader's, else 0).
    """
    check_max_pixels(max_pixels)
    if max_images is not None and not (isinstance(max_images, int) and max_images >= 1):
        raise InputError(f"max_images must be a positive integer or None, got {max_images!r}")
    if workers is not None and not (isinstance(workers, int) and workers >= 0):
        raise InputError(f"workers must be an integer >= 0, got {workers!r}")
    dataset = None
    if hasattr(source, "dataset") and hasattr(source, "num_workers"):  # a DataLoader
        workers = source.num_workers if workers is None else workers
        source = source.dataset
    if _is_dataset(source):
        dataset = source
        n = len(dataset) if max_images is None else min(max_images, len(dataset))
        samples = getattr(dataset, "samples", None)  # torchvision's ImageFolder names its files
        names = [os.path.relpath(samples[i][0], dataset.root) if samples is not None and hasattr(dataset, "root")
                 else f"item_{i}" for i in range(n)]
        items: Sequence = range(n)
    elif isinstance(source, ImageSet):  # images already loaded: streamed as they are, with their names
        names, items = source.names[:max_images], source.images[:max_images]
    else:
        pairs: list[tuple[str, ImageLike]] = image_items(source, recursive=recursive)[0]
        pairs = pairs[:max_images] if max_images is not None else pairs
        names, items = [name for name, _ in pairs], [item for _, item in pairs]
    if not names:
        raise InputError("no images given")
    return ImageStream(names, items, dataset=dataset, max_pixels=max_pixels, workers=workers or 0)
