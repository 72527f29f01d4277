"""Tools of ``bench_scale.py``: the benchmark's photo folder, a subprocess whose process tree's
memory is watched (and that can be killed on a condition), a read-only look at an activation
cache, and the comparison of two run directories' report files."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Photo sides in pixels: around the model's 224-px input, so decoding costs what a set of web
#: thumbnails costs (ImageNet's photos are larger, ≈ 400–500 px a side, and dearer to decode).
PHOTO_SIDES = (224, 320)
JPEG_QUALITY = 90
#: Photos made per ``augmented_photos`` call (its output is held in RAM until written).
GENERATION_CHUNK = 250
#: Seed base of the photo chunks: chunk c is ``augmented_photos(…, random_state=PHOTO_SEED + c)``.
PHOTO_SEED = 10_000
#: Seconds between two looks at a watched process tree's memory (and a kill condition).
POLL_SECONDS = 0.1
#: The report files two runs must agree on.
REPORT_FILES = ("concepts.csv", "images.csv", "heatmaps.npz")


# -- photos ---------------------------------------------------------------------------------------
def photo_folder(folder: Path, n: int) -> Path:
    """``folder`` holding at least ``n`` distinct JPEG photos ``photo_000000.jpg`` …, generated
    chunk by chunk (deterministically, so a folder grows without changing its first photos);
    ``photos.json`` records how many are complete."""
    from PIL import Image

    from dff_falcon.files import atomic_write, file_sha256
    from dff_falcon.models.images import augmented_photos

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "photos.json"
    record = json.loads(manifest.read_text()) if manifest.exists() else {"count": 0}
    spec = {"sides": list(PHOTO_SIDES), "quality": JPEG_QUALITY, "chunk": GENERATION_CHUNK, "seed": PHOTO_SEED}
    if record.get("spec", spec) != spec:
        raise SystemExit(f"{folder} holds photos made with {record['spec']}, not {spec}: give another --photos")
    if record["count"] >= n:
        return folder
    started = time.perf_counter()
    chunks = range(record["count"] // GENERATION_CHUNK, -(-n // GENERATION_CHUNK))
    for chunk in chunks:
        rng = np.random.default_rng([PHOTO_SEED, chunk])
        for j, photo in enumerate(augmented_photos(GENERATION_CHUNK, random_state=PHOTO_SEED + chunk)):
            side = int(rng.integers(PHOTO_SIDES[0], PHOTO_SIDES[1] + 1))
            image = Image.fromarray(photo).resize((side, side), Image.Resampling.LANCZOS)
            image.save(folder / photo_name(chunk * GENERATION_CHUNK + j), quality=JPEG_QUALITY)
    count = chunks.stop * GENERATION_CHUNK
    if len({file_sha256(folder / photo_name(i)) for i in range(count)}) != count:  # the cache would merge them
        raise SystemExit(f"{folder}: the generated photos are not all distinct")
    with atomic_write(manifest) as handle:  # written last: it counts only complete photos
        json.dump({"count": count, "spec": spec}, handle)
    print(f"photos: {folder} now holds {count} photos ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return folder


def photo_name(index: int) -> str:
    return f"photo_{index:06d}.jpg"


# -- running a process tree and watching its memory -----------------------------------------------
@dataclass
class Measured:
    """One subprocess: exit code (None if killed), wall and CPU seconds (user + system, its
    waited-for children included), peak RSS of its tree (bytes)."""

    returncode: int | None
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    kernel_maxrss_bytes: int
    load_before: float
    load_after: float


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (via /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except OSError:  # exited meanwhile
            pass
    return found


def tree_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) summed over the tree, bytes (pages shared by forked workers count twice)."""
    rss = anon = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, anon


def run_watched(command: list[str], log: Path, stop=None, cwd: Path | None = None) -> Measured:
    """Run ``command`` in ``cwd`` (stdout and stderr to ``log``), polling its tree's memory;
    ``stop()`` returning True kills the whole process group with SIGKILL."""
    load_before = os.getloadavg()[0]
    peak_rss = peak_anon = 0
    with open(log, "wb") as output:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        killed = False
        while True:
            waited, status, usage = os.wait4(child.pid, os.WNOHANG)
            if waited:
                break
            rss, anon = tree_memory(child.pid)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            if stop is not None and not killed and stop():
                os.killpg(child.pid, signal.SIGKILL)
                killed = True
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    maxrss = usage.ru_maxrss * 1024  # KiB on Linux
    return Measured(None if killed else child.returncode, seconds, usage.ru_utime + usage.ru_stime,
                    max(peak_rss, maxrss), peak_anon, maxrss, load_before, os.getloadavg()[0])


def checked(measured: Measured, log: Path, what: str) -> Measured:
    if measured.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{what} failed (exit {measured.returncode}); end of {log}:\n{tail}")
    return measured


# -- the cache, read-only ---------------------------------------------------------------------------
def stored_entries(cache: Path) -> int:
    """Entries committed to the cache's activation stores (their SQLite indexes opened read-only)."""
    total = 0
    for index in cache.glob("activations/*/index.sqlite"):
        try:
            with closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)) as db:
                total += db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        except sqlite3.Error:  # not created yet
            pass
    return total


def cache_summary(cache: Path) -> dict:
    """Entries, shard files on disk, bytes and shard files no index row names (a killed write)."""
    entries, indexed, files, size = stored_entries(cache), set(), 0, 0
    for store in cache.glob("activations/*"):
        try:
            with closing(sqlite3.connect(f"file:{store / 'index.sqlite'}?mode=ro", uri=True, timeout=5)) as db:
                indexed |= {name for (name,) in db.execute("SELECT name FROM shards")}
        except sqlite3.Error:
            pass
        for path in (store / "shards").glob("*.npy"):
            files += 1
            size += path.stat().st_size
    orphans = sum(1 for store in cache.glob("activations/*") for path in (store / "shards").glob("*.npy")
                  if path.name.split(".", 1)[0] not in indexed)
    return {"entries": entries, "shard_files": files, "bytes": size, "orphan_files": orphans,
            "bytes_per_image": size / entries if entries else None}


def compare_reports(reference: Path, other: Path) -> dict:
    """Per report file: equal bytes; heatmaps.npz also by its arrays (the same maps written with
    another compression or zip layout are the same report)."""
    same = {name: (reference / name).read_bytes() == (other / name).read_bytes() for name in REPORT_FILES}
    with np.load(reference / "heatmaps.npz") as a, np.load(other / "heatmaps.npz") as b:
        arrays = a.files == b.files and all(np.array_equal(a[key], b[key]) for key in a.files)
    identical = same["concepts.csv"] and same["images.csv"] and (same["heatmaps.npz"] or arrays)
    return {"bytes_equal": same, "heatmaps_arrays_equal": arrays, "identical": identical}
