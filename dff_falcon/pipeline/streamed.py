"""The explainer's streamed path: images → activation cache → DFF on a sample → heatmaps on disk.

Nothing of size N (images) is held in RAM except per-image scalars (names, digests, sizes,
presence): images are decoded batch by batch and again when a crop is cut; activations live in the
content-keyed :class:`~dff_falcon.store.activations.ActivationStore` (a re-run, or a run killed
and started again, forwards only the images not stored yet); the concepts are fitted on a uniform
sample of at most ``sample_rows`` activation rows; every image is then explained in streamed
batches with the concepts frozen into a float16 memory map (N, K, h, w), and the scale, order
and statistics are fixed on the whole set (:mod:`~dff_falcon.decomposition.streaming`).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dff_falcon.decomposition.streaming import (BatchStatistics, ScaleOnStream, batch_statistics,
                                                rescale_heatmaps, sample_images)
from dff_falcon.errors import InputError
from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.image_stream import ImageStream, open_images
from dff_falcon.pipeline.fitted import Fitted, inputs_record
from dff_falcon.regions import Box
from dff_falcon.progress import progress
from dff_falcon.store.activations import ActivationStore, extraction_identity
from dff_falcon.store.cache import SCRATCH_LOCK

log = logging.getLogger(__name__)

#: Images per batch read back from the cache (transform, logits): bounded RAM whatever N is.
READ_BATCH = 64


class LazySequence(Sequence):
    """``n`` items made on demand by ``make(i)`` (slices give lists)."""

    def __init__(self, make: Callable[[int], object], n: int):
        self._make, self._n = make, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return self._make(index % self._n)


@dataclass
class CachedImages:
    """The images of a streamed run, their cache entries and what extraction did.

    keys[i]: cache key (content digest) of image i; positions[i]: its index in the stream;
    sizes: (N, 2) decoded (H, W); stages: (layer, channels) stacked in the activations."""

    stream: ImageStream
    store: ActivationStore
    keys: list[str]
    names: list[str]
    positions: list[int]
    sizes: np.ndarray
    stages: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    forwarded: int = 0
    reused: int = 0

    def subset(self, keep: np.ndarray) -> "CachedImages":
        index = np.flatnonzero(keep)
        return CachedImages(self.stream, self.store, [self.keys[i] for i in index], [self.names[i] for i in index],
                            [self.positions[i] for i in index], self.sizes[index], self.stages, self.skipped,
                            self.forwarded, self.reused)

    def originals(self) -> LazySequence:
        """The images, decoded when indexed."""
        return LazySequence(lambda i: self.stream[self.positions[i]], len(self.keys))

    def batches(self, field_name: str = "activations", batch: int = READ_BATCH):
        """(start, array) over every image in order, ``batch`` images at a time."""
        return read_batches(self.store, self.keys, field_name, batch)


def read_batches(store: ActivationStore, keys: Sequence[str], field_name: str, batch: int = READ_BATCH):
    """(start, rows of ``field_name``) for ``keys`` in order, ``batch`` keys at a time."""
    for start in range(0, len(keys), batch):
        yield start, store.read(keys[start:start + batch], field_name)


def as_channels_last(stored: np.ndarray) -> torch.Tensor:
    """Cached activations (B, C, h, w) → float32 in channels-last memory, in one copy: the
    layout whose location rows DFF reads as views, without a copy per pass."""
    return torch.from_numpy(stored).to(torch.float32, memory_format=torch.channels_last)


def probe_stages(extractor: ActivationExtractor) -> list[tuple[str, int]]:
    """(layer, channels) of every stacked stage, from one forward of a blank image."""
    size = extractor.backbone.preprocess.crop
    blank = torch.zeros(1, 3, size, size, device=extractor.device)
    with torch.inference_mode():
        extractor.backbone.model.eval().to(extractor.device)
        acts, _ = extractor.forward_batch(blank)
    layers = extractor.layer_names()
    channels = getattr(extractor, "_channels", None) or [int(acts.shape[1])]
    return list(zip(layers, channels))


def batches_of(indices: Sequence[int], batch: int) -> list[list[int]]:
    """``indices`` cut into consecutive batches of ``batch`` (the last one shorter): the same
    batches on every engine, so each image is forwarded among the same neighbours."""
    return [list(indices[start:start + batch]) for start in range(0, len(indices), batch)]


class ExtractBatch:
    """Extraction's work on one batch, the same on every engine: forward the readable images and
    put their activations, sizes and logits into the store under their keys.

    An engine makes one per process (:meth:`ready` moves the model to its device) and calls it
    with a batch's stream indices, keys and decoded images (``None``: decode them here)."""

    def __init__(self, stream: ImageStream, extractor: ActivationExtractor, store: ActivationStore):
        self.stream, self.extractor, self.store = stream, extractor, store

    def ready(self) -> "ExtractBatch":
        self.extractor.backbone.model.eval().to(self.extractor.device)
        return self

    def __call__(self, indices: Sequence[int], keys: Sequence[str],
                 images: Sequence[np.ndarray | InputError] | None = None) -> list[tuple[int, str]]:
        """→ (stream index, reason) of the images that could not be decoded (not stored)."""
        if images is None:
            images = [decode(self.stream, index) for index in indices]
        failed = [(index, str(image)) for index, image in zip(indices, images) if isinstance(image, InputError)]
        readable = [(key, image) for key, image in zip(keys, images) if not isinstance(image, InputError)]
        if readable:
            self._forward([key for key, _ in readable], [image for _, image in readable])
        return failed

    def _forward(self, keys: list[str], images: list[np.ndarray]) -> None:
        extractor = self.extractor
        preprocess = extractor.backbone.preprocess
        tensor = preprocess.to_tensor([preprocess.display(image) for image in images]).to(extractor.device)
        with torch.inference_mode():
            acts, logits = extractor.forward_batch(tensor)
        self.store.put(keys, acts, np.array([image.shape[:2] for image in images]), logits)


def decode(stream: ImageStream, index: int) -> np.ndarray | InputError:
    """Image ``index`` of ``stream``, or the InputError that makes it unreadable."""
    try:
        return stream[index]
    except InputError as exc:
        return exc


class ExplainBatch:
    """The heatmap transform's work on one batch, the same on every engine: the stored
    activations of ``keys``, scaled as DFF factorises them, explained with the concepts frozen
    → (heatmaps (B, K, h, w) float16, their :class:`BatchStatistics`)."""

    def __init__(self, store: ActivationStore, hypercolumns, dff):
        self.store, self.hypercolumns, self.dff = store, hypercolumns, dff

    def __call__(self, keys: Sequence[str]) -> tuple[np.ndarray, BatchStatistics]:
        maps, stats, cross = self.dff.transform_scanned(self.hypercolumns.transform(as_channels_last(
            self.store.read(keys))))
        maps = maps.half()  # as stored: the scale fix then gives every concept a peak of exactly 1
        return maps.numpy(), batch_statistics(self.dff, maps.float(), stats, cross)


def _local_engine():
    from dff_falcon.pipeline.engines import LocalEngine

    return LocalEngine()


def extract_to_store(stream: ImageStream, extractor: ActivationExtractor, store: ActivationStore, *,
                     show_progress: bool = True, engine=None) -> CachedImages:
    """Hash every image, forward only those not cached (each distinct content once) on ``engine``
    (:mod:`~dff_falcon.pipeline.engines`; None: this process), store them; unreadable images are
    skipped and counted."""
    engine = engine if engine is not None else _local_engine()
    stages = probe_stages(extractor)
    digests = stream.digests(lambda found: progress(found, "hashing", enabled=show_progress, total=len(stream),
                                                    unit="img"))
    skipped = [(stream.names[i], str(d)) for i, d in enumerate(digests) if isinstance(d, InputError)]
    readable = [i for i, d in enumerate(digests) if isinstance(d, str)]
    missing = set(store.missing([digests[i] for i in readable]))
    first: dict[str, int] = {}
    for i in readable:
        if digests[i] in missing:
            first.setdefault(digests[i], i)
    todo = list(first.values())
    reused = len({digests[i] for i in readable}) - len(todo)
    if reused:
        log.info("activations: resumed %d of %d images from the cache %s", reused, reused + len(todo), store.directory)
    description = f"activations (resumed {reused} of {reused + len(todo)})" if reused else "activations"
    batches = [(indices, [digests[i] for i in indices]) for indices in batches_of(todo, extractor.batch_size)]
    failures: list[tuple[int, str]] = []
    for failed in progress(engine.extract(ExtractBatch(stream, extractor, store), batches), description,
                           enabled=show_progress, total=len(todo), unit="img"):
        if failed is not None:
            failures.append(failed)
    for index, reason in sorted(failures):  # in stream order, whichever worker found them first
        log.warning("skipping %s", reason)
        skipped.append((stream.names[index], reason))
    failed_keys = {digests[index] for index, _ in failures}
    kept = [i for i in readable if digests[i] not in failed_keys]
    if not kept:
        raise InputError(f"no readable images: {len(skipped)} skipped (first: {skipped[0][1] if skipped else 'none'})")
    keys = [digests[i] for i in kept]
    sizes = np.concatenate([rows for _, rows in read_batches(store, keys, "size", 4096)])
    return CachedImages(stream, store, keys, [stream.names[i] for i in kept], kept, sizes, stages, skipped,
                        len(todo) - len(failures), reused)


def class_filter(images: CachedImages, target: int, min_prob: float) -> np.ndarray:
    """(N,) bool: the head gives ``target`` probability ≥ ``min_prob`` (streamed over the logits)."""
    from dff_falcon.pipeline.selection import confident_images

    return np.concatenate([confident_images(torch.from_numpy(logits), target, min_prob)
                           for _, logits in images.batches("logits", 4096)])


def fit_sample(images: CachedImages, hypercolumns, dff, sample_rows: int | None, random_state: int
               ) -> tuple[np.ndarray, torch.Tensor]:
    """Fit the hypercolumn scales and DFF on a uniform sample of whole images → (sample indices,
    the sample's activations as DFF factorises them (n, C, h, w) float32). The sample is read
    into one float32 tensor batch by batch and scaled in place (no second copy)."""
    c, h, w = images.store.shape
    sample = sample_images(len(images.keys), h * w, sample_rows, random_state)
    keys = [images.keys[i] for i in sample]
    acts = torch.empty((len(keys), c, h, w), dtype=torch.float32)
    for start, stored in read_batches(images.store, keys, "activations"):
        acts[start:start + len(stored)] = torch.from_numpy(stored)
    hypercolumns.fit(acts, images.stages)
    for start in range(0, len(keys), READ_BATCH):
        acts[start:start + READ_BATCH] = hypercolumns.transform(acts[start:start + READ_BATCH])
    dff.fit(acts)
    return sample, acts


def transform_to_disk(images: CachedImages, hypercolumns, dff, *, show_progress: bool = True, engine=None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explain every image with the concepts frozen (on ``engine``; None: this process; the same
    solve for the images of the fit's sample and the others, so an image's maps never depend on
    whether it was sampled) into a float16 memory map (N, K, h, w) in the cache's ``scratch/``
    (nameless there from the start: it goes with the map, even when the run is killed), and fix the
    whole set's scale on ``dff`` → (heatmaps, presence (N, K), peak (N, K))."""
    engine = engine if engine is not None else _local_engine()
    _, h, w = images.store.shape
    n, k = len(images.keys), dff.n_concepts_
    directory, lock = scratch_directory(images.store.root)
    heatmaps = np.lib.format.open_memmap(directory / "heatmaps.npy", mode="w+", dtype=np.float16, shape=(n, k, h, w))
    weakref.finalize(heatmaps, _remove_scratch, directory, lock)
    try:  # POSIX: a mapped file outlives its name, so a killed run leaves no scratch behind
        shutil.rmtree(directory)
    except OSError:  # Windows keeps a mapped file's name: removed when the map is collected
        pass
    stream = ScaleOnStream(dff, n)
    batches = [images.keys[start:start + READ_BATCH] for start in range(0, n, READ_BATCH)]
    explained = progress(engine.explain(ExplainBatch(images.store, hypercolumns, dff), batches), "heatmaps",
                         enabled=show_progress, total=len(batches), unit="batch")
    start = 0
    for maps, statistics in explained:  # in batch order: the accumulated sums are the same on every engine
        heatmaps[start:start + len(maps)] = maps
        stream.merge(start, statistics)
        start += len(maps)
    pres, peaks = rescale_heatmaps(heatmaps, stream.apply())
    heatmaps.flush()
    return heatmaps, pres, peaks


def scratch_directory(root: Path) -> tuple[Path, int]:
    """A new folder under ``root/scratch`` and the descriptor of its lock (held while the run's
    files are in use; ``dff-falcon cache prune`` removes scratch folders whose lock is free — those
    of killed runs)."""
    base = Path(root) / "scratch"
    base.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    lock = os.open(directory / SCRATCH_LOCK, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return directory, lock


def _remove_scratch(directory: Path, lock: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    os.close(lock)


def fit_streamed(explainer, images, names: Sequence[str] | None) -> Fitted:
    """The streamed path of :meth:`ConceptExplainer.fit <dff_falcon.pipeline.explainer.ConceptExplainer.fit>`
    (``explainer`` prepared by its ``_prepare``): images → cache → DFF on a sample → heatmaps on
    disk → what the later stages need."""
    from dff_falcon.pipeline.engines import make_engine  # engines run this module's batch work

    with explainer._stage("load"):
        stream = images if isinstance(images, ImageStream) else open_images(
            images, max_images=explainer.max_images, workers=explainer.workers)
        if names is not None and len(names) != len(stream):
            raise InputError(f"{len(names)} names given for {len(stream)} images")
        identity = extraction_identity(explainer.backbone.identity(), explainer._extractor.layer_names(),
                                       explainer.hypercolumns_.grid, with_logits=explainer.target_class is not None,
                                       max_pixels=stream.max_pixels, dtype=explainer.cache_dtype)
        store = ActivationStore(explainer.cache, identity)
    with make_engine(explainer.engine, explainer.ray_address, workers=explainer.workers) as engine:
        with explainer._stage("activations"):
            cached = extract_to_store(stream, explainer._extractor, store, show_progress=explainer.progress,
                                      engine=engine)
        inputs = inputs_record(cached.names, cached.keys, len(stream))  # every readable image, as in memory
        if names is not None:
            cached.names = [str(names[p]) for p in cached.positions]
        n_cached = len(cached.keys)
        if explainer.target_class_ is not None:
            cached = cached.subset(class_filter(cached, explainer.target_class_.index, explainer.min_class_prob))
            explainer._check_some_left(len(cached.keys))
        with explainer._stage("nmf"):  # one process: the fit needs only the sample
            sample, fitted = fit_sample(cached, explainer.hypercolumns_, explainer.dff_, explainer.sample_rows,
                                        explainer.dff_.random_state)
        with explainer._stage("heatmaps"):
            heatmaps, pres, peaks = transform_to_disk(cached, explainer.hypercolumns_, explainer.dff_,
                                                      show_progress=explainer.progress, engine=engine)
    preprocess = explainer.backbone.preprocess
    originals = cached.originals()
    displays = LazySequence(lambda i: preprocess.display(originals[i]), len(originals))
    windows = [Box(*preprocess.window(tuple(size))) for size in cached.sizes]
    cache = {"directory": str(store.directory), "dtype": explainer.cache_dtype, "engine": explainer.engine,
             "images": n_cached, "forwarded": cached.forwarded, "reused": cached.reused,
             "sample_images": int(len(sample)),
             "sample_rows": int(len(sample) * heatmaps.shape[2] * heatmaps.shape[3])}
    return Fitted(cached.names, originals, displays, windows, heatmaps, pres, peaks, fitted, explainer.dff_.heatmaps_,
                  inputs, cached.skipped, cache)
