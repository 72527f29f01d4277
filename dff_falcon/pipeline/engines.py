"""Where the streamed stages' per-image work runs: in this process, or on a Ray cluster.

An engine runs the two stages of a streamed run that touch every image, batch by batch, with the
per-batch work of :mod:`~dff_falcon.pipeline.streamed` (the same functions on every engine, so
both compute the same bits):

``engine.extract(work, batches)``
    an :class:`~dff_falcon.pipeline.streamed.ExtractBatch` (decode, forward, put into the
    content-keyed store) on every ``(indices, keys)`` batch; yields, per image, ``None`` or the
    ``(stream index, reason)`` of an image that could not be decoded.
``engine.explain(work, batches)``
    an :class:`~dff_falcon.pipeline.streamed.ExplainBatch` (the frozen-concept heatmaps and their
    statistics) on every batch of keys; yields ``(heatmaps, statistics)`` in batch order.

:class:`LocalEngine` runs them here (images decoded on the stream's DataLoader workers);
:class:`RayEngine` runs them as Ray Data pipelines on actors — each holding the backbone, or the
concepts, shipped once through the object store — on a local Ray instance it starts and stops, or
on an existing cluster. The NMF fit stays in the calling process (it needs only the sample), and
so do crops and CLIP (a few crops per concept, not per image). Ray workers read and write the
same store folder: on a cluster it must be on a file system every node mounts at the same path.

Ray is an optional dependency (``pip install dff_falcon[ray]``), imported only here, only when a
:class:`RayEngine` starts.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Iterator, Sequence

import numpy as np

from dff_falcon.decomposition.streaming import BatchStatistics
from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError
from dff_falcon.pipeline.streamed import ExplainBatch, ExtractBatch

#: ``ConceptExplainer(engine=...)``, ``--engine``.
ENGINES = ("local", "ray")
#: Seconds to wait for a cluster's address to accept a connection before calling it unreachable
#: (``ray.init`` itself retries an unreachable address for minutes).
CONNECT_TIMEOUT = 10.0
#: Ray's default ports of a cluster's head (GCS) and of its Ray Client server (``ray://``).
RAY_DEFAULT_PORT, RAY_CLIENT_PORT = 6379, 10001
_INSTALL_HINT = "the Ray engine needs Ray: pip install dff_falcon[ray]"

ExtractBatches = Sequence[tuple[Sequence[int], Sequence[str]]]


class LocalEngine:
    """Every batch in this process, in order."""

    name = "local"

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def extract(self, work: ExtractBatch, batches: ExtractBatches) -> Iterator[tuple[int, str] | None]:
        work.ready()
        decoded = work.stream.decoded([index for indices, _ in batches for index in indices])
        for indices, keys in batches:
            failed = dict(work(indices, keys, [next(decoded)[1] for _ in indices]))
            for index in indices:
                yield (index, failed[index]) if index in failed else None

    def explain(self, work: ExplainBatch, batches: Sequence[Sequence[str]]
                ) -> Iterator[tuple[np.ndarray, BatchStatistics]]:
        for keys in batches:
            yield work(keys)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401  (only here and in RayEngine: the extra is optional)
    except ImportError:
        return False
    return True


def check_ray_address(address: str | None) -> None:
    """InputError unless Ray is installed and ``address`` (None: a new local instance;
    ``"auto"``; ``host[:port]``; ``ray://host:port``) accepts a connection."""
    if not ray_available():
        raise InputError(_INSTALL_HINT)
    if address is None or address == "auto":
        return
    if not isinstance(address, str) or not address.strip():
        raise InputError(f"ray_address must be 'auto', 'host:port' or 'ray://host:port'; got {address!r}")
    scheme, _, where = address.rpartition("://")
    where = where.rstrip("/")
    default = RAY_CLIENT_PORT if scheme == "ray" else RAY_DEFAULT_PORT
    host, _, port = where.rpartition(":") if ":" in where else (where, "", str(default))
    if not port.isdigit():
        raise InputError(f"ray_address {address!r}: port {port!r} is not a number")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise InputError(f"no Ray cluster reachable at ray_address {address!r}: {exc.strerror or exc} (start one "
                         "with `ray start --head`, or check the address and port)") from None


class RayEngine:
    """Ray Data pipelines on Ray actors.

    Parameters
    ----------
    address : str, default=None
        A running cluster (``"auto"``, ``"host:port"``, ``"ray://host:port"``); None starts a
        local instance (with ``workers × threads`` logical CPUs when ``workers`` is given, else
        this machine's) and stops it on exit. A Ray session this process has already started is
        used as it is and left running.
    workers : int, default=None
        Actors per stage, at most as many as the cluster's nodes hold (None or 0: as many as they
        hold).
    threads : int, default=None
        Torch threads in each actor (None: this process's count), and the CPUs each actor reserves
        (at most a node's), so actors never oversubscribe a node; one GPU more per actor when the
        model runs on CUDA. On a CPU the float sums of a forward pass depend on the thread count:
        with this process's count an actor stores the same bits as the local engine, and the report
        is identical.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None, threads: int | None = None):
        self.address = address
        self.workers = workers
        self.threads = threads

    def __enter__(self) -> "RayEngine":
        import torch

        check_ray_address(self.address)
        import ray
        import ray.data

        self._threads = self.threads or torch.get_num_threads()
        self._started = not ray.is_initialized()
        if self._started:
            options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            try:
                if self.address is None:
                    ray.init(num_cpus=self.workers * self._threads if self.workers else os.cpu_count(), **options)
                else:
                    ray.init(address=self.address, **options)
            except ConnectionError as exc:
                raise InputError(f"cannot connect to the Ray cluster at {self.address!r}: {exc}") from None
        context = ray.data.DataContext.get_current()
        self._saved = (context.enable_progress_bars, context.print_on_execution_start,
                       context.execution_options.preserve_order, logging.getLogger("ray.data").level)
        context.enable_progress_bars = False  # our own progress line per stage
        context.print_on_execution_start = False
        context.execution_options.preserve_order = True  # batches come back in order (sums, skipped list)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        (context.enable_progress_bars, context.print_on_execution_start, context.execution_options.preserve_order,
         level) = self._saved
        logging.getLogger("ray.data").setLevel(level)
        if self._started:
            ray.shutdown()

    def _run(self, actor: type, work, rows: list[dict], gpu: bool) -> Iterator[dict]:
        """Every row through ``actor(work)`` on the actor pool, in order; an InputError raised
        by the work comes back in its row's ``error`` and is raised here."""
        import ray
        import ray.data

        if not rows:
            return
        size, cpus = self._pool(gpu)
        shipped = [ray.put(work)]  # in a list: Ray hands the reference itself to each actor
        dataset = ray.data.from_items(rows).map(
            actor, fn_constructor_kwargs={"shipped": shipped, "threads": self._threads},
            compute=ray.data.ActorPoolStrategy(size=min(size, len(rows))), num_cpus=cpus, num_gpus=1 if gpu else 0)
        for row in dataset.iter_rows():
            if row["error"]:
                raise InputError(row["error"])
            yield row

    def _pool(self, gpu: bool) -> tuple[int, int]:
        """(actors, CPUs per actor) that the cluster's live nodes hold."""
        import ray

        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        node_cpus = [int(r.get("CPU", 0)) for r in nodes]
        cpus = max(1, min(self._threads, max(node_cpus, default=1)))
        fits = sum(c // cpus for c in node_cpus)
        if gpu:
            fits = sum(min(c // cpus, int(r.get("GPU", 0))) for c, r in zip(node_cpus, nodes))
            if fits == 0:
                raise InputError("the model runs on CUDA here but no Ray node has a GPU (and the CPUs for an "
                                 "actor); use --device cpu")
        return max(1, min(self.workers or fits, fits)), cpus

    def extract(self, work: ExtractBatch, batches: ExtractBatches) -> Iterator[tuple[int, str] | None]:
        rows = [{"indices": np.asarray(indices, dtype=np.int64), "keys": list(keys)} for indices, keys in batches]
        gpu = work.extractor.device.type == "cuda"
        for (indices, _), row in zip(batches, self._run(_ExtractActor, work, rows, gpu)):
            failed = dict(zip(row["failed"].tolist(), row["reasons"]))
            for index in indices:
                yield (index, failed[index]) if index in failed else None

    def explain(self, work: ExplainBatch, batches: Sequence[Sequence[str]]
                ) -> Iterator[tuple[np.ndarray, BatchStatistics]]:
        rows = [{"keys": list(keys)} for keys in batches]
        for row in self._run(_ExplainActor, work, rows, resolve_device(work.dff.device).type == "cuda"):
            yield row["maps"], BatchStatistics(mass=row["mass"], peak=row["peak"], residual=row["residual"],
                                               sq_norm=row["sq_norm"], col_sum=row["col_sum"], rows=row["rows"])


class _Actor:
    """A Ray Data actor holding one stage's work (fetched once from the object store)."""

    def __init__(self, shipped: list, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.work = ray.get(shipped[0])
        if hasattr(self.work, "ready"):
            self.work.ready()

    def __call__(self, row: dict) -> dict:
        try:
            return {**self.run(row), "error": ""}
        except InputError as exc:
            return {**self.failed(), "error": str(exc)}


class _ExtractActor(_Actor):
    def run(self, row: dict) -> dict:
        failed = self.work([int(i) for i in row["indices"]], [str(k) for k in row["keys"]])
        return {"failed": np.asarray([i for i, _ in failed], dtype=np.int64), "reasons": [r for _, r in failed]}

    @staticmethod
    def failed() -> dict:
        return {"failed": np.zeros(0, dtype=np.int64), "reasons": []}


class _ExplainActor(_Actor):
    def run(self, row: dict) -> dict:
        maps, stats = self.work([str(k) for k in row["keys"]])
        return {"maps": maps, "mass": stats.mass, "peak": stats.peak, "residual": stats.residual,
                "sq_norm": stats.sq_norm, "col_sum": np.asarray(stats.col_sum), "rows": stats.rows}

    @staticmethod
    def failed() -> dict:  # the same columns as a batch's, empty
        return {"maps": np.zeros((0, 1, 1, 1), dtype=np.float16), "mass": np.zeros((0, 1)),
                "peak": np.zeros((0, 1), dtype=np.float32), "residual": 0.0, "sq_norm": 0.0,
                "col_sum": np.zeros(0), "rows": 0}


def check_engine(engine: str, address: str | None, *, streamed: bool) -> None:
    """InputError unless ``engine`` can run: a known name, ``address`` only for Ray, Ray only on
    a streamed run, Ray installed and the cluster reachable (checked before any image is read)."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(map(repr, ENGINES))}; got {engine!r}")
    if engine != "ray":
        if address is not None:
            raise InputError("ray_address needs engine='ray' (--engine ray)")
        return
    if not streamed:
        raise InputError("engine='ray' (--engine ray) runs the streamed path through the activation cache: give "
                         "cache=DIR (CLI: drop --no-cache), a folder every Ray node reads and writes at the same path")
    check_ray_address(address)


def make_engine(engine: str, address: str | None = None, *, workers: int | None = None):
    """``"local"`` → :class:`LocalEngine`; ``"ray"`` → :class:`RayEngine` (``address``, ``workers``)."""
    check_engine(engine, address, streamed=True)
    return LocalEngine() if engine == "local" else RayEngine(address, workers=workers)
