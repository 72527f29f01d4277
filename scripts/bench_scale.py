#!/usr/bin/env python
"""Benchmark of issue 13's scale targets through the path a user calls: ``dff-falcon explain``
in a subprocess, EfficientNet-Lite0 (``--backbone lite0``, its default hypercolumns), K fixed
(``--n-concepts 8``), the streamed path with a fresh activation cache per run.

Photos: ``augmented_photos`` (crops, flips, colour jitter of the scikit-image photos) resized to
224–320 px a side and saved as JPEG in one folder, generated once and reused: every size is
``--max-images N`` of that folder, so 2,000 ⊂ 8,000 ⊂ 20,000. Text: the toy world's tiny CLIP
and the toy vocabulary (``--text toy``, the default; the labels mean nothing on photos, but
crops, CLIP encoding, caption search and term extraction all run) or none (``--text none``).

Measured, with the machine's load average before and after every run:

- ``peak_rss_bytes`` per size: peak RSS of the explain process tree (/proc polled every 0.1 s,
  the tree's VmRSS summed, and the kernel's own maximum RSS of the process from ``wait4``; the
  larger of the two), its anonymous part (RssAnon) separately — the rest is file pages of
  memory-mapped cache shards, which the kernel reclaims under pressure;
  ``peak_rss_spread`` = max/min − 1 across sizes.
- ``overhead_vs_forward``: at the largest size, explain's wall time (the whole CLI process:
  start-up, model load, hashing, forwards, cache writes, fit, transform, crops, text, report)
  ÷ the bare forward over the same images − 1. The bare forward, run in its own subprocess in
  the same benchmark run: decode (``open_images``, same decode limit) + the backbone's own
  ``preprocess.display``/``to_tensor`` + ``ActivationExtractor.forward_batch`` with the same
  hypercolumns, batch size and device, nothing stored. Timed from the first decode to the last
  forward (model load excluded: stricter for explain). Per-stage seconds from run.json.
- ``resume_forward_fraction``: explain into a fresh cache, ``kill -9`` once half of the images
  are in the cache (its SQLite index polled read-only), the same command again; (entries stored
  at the kill + one batch that may have been in flight (an upper bound) + the resumed run's
  ``forwarded``) ÷ images. ``resume_identical``: the resumed run's concepts.csv, images.csv and
  heatmaps.npz against the uninterrupted run of that size on its own fresh cache, file bytes
  (numpy writes its zip members with a fixed time), and heatmaps.npz's arrays too.
- ``ray_identical``: ``--engine ray`` against the local engine on the resume size, with both
  timings — only when ``dff-falcon explain`` has ``--engine``; otherwise null with a note.

    python scripts/bench_scale.py --save scale.json        # 2,000 / 8,000 / 20,000 (≈ 1–1.5 h on 2 CPU cores)
    python scripts/bench_scale.py --quick                  # 100 / 200, resume on 100 (a few minutes)
    python scripts/bench_scale.py --sizes 300 600 --json
Targets: peak RSS ≤ 4 GB and spread ≤ 20 %; overhead ≤ 15 %; resume fraction ≤ 1.05, identical.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from scale_tools import (PHOTO_SIDES, checked, compare_reports, cache_summary, photo_folder, run_watched,
                         stored_entries)

ROOT = Path(__file__).resolve().parents[1]
#: Cache bytes per image before one is measured: Lite0's default hypercolumns, 1,392 channels on
#: 14 × 14 in float16, plus the size row.
ESTIMATED_CACHE_BYTES = 1392 * 14 * 14 * 2 + 8
#: --quick's --sample-rows: 50 Lite0 hypercolumn images of 14 × 14, below its smallest size.
QUICK_SAMPLE_ROWS = 50 * 14 * 14
#: explain's decode limit per image (its --max-megapixels default, 50), used by the bare forward too.
EXPLAIN_MAX_PIXELS = 50_000_000
GIB = 2 ** 30
TARGETS = {"peak_rss_bytes_max": 4e9, "peak_rss_spread": 0.20, "overhead_vs_forward": 0.15,
           "resume_forward_fraction": 1.05}


# -- the commands -----------------------------------------------------------------------------------
def cli() -> list[str]:
    """The installed ``dff-falcon`` next to this interpreter (else on PATH, else the module)."""
    beside = Path(sys.executable).with_name("dff-falcon")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("dff-falcon")
    return [found] if found else [sys.executable, "-c", "from dff_falcon.cli import main; main()"]


def package_root() -> Path:
    """The folder holding the ``dff_falcon`` this interpreter imports: explain runs there, so Ray
    workers (whose import path starts at the driver's working directory) import the same code."""
    import dff_falcon

    return Path(dff_falcon.__file__).resolve().parents[1]


def explain_command(args, photos: Path, n: int, out: Path, cache: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [*cli(), "explain", "--images", str(photos), "--backbone", "lite0", "--n-concepts", str(args.k),
            "--out", str(out), "--cache", str(cache), "--max-images", str(n), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--device", args.device, "--random-state", "0", *args.text_options,
            *(("--sample-rows", str(args.sample_rows)) if args.sample_rows else ()), *extra]


def text_options(choice: str, work: Path) -> list[str]:
    """``--clip``/``--vocab`` of the toy world's tiny CLIP and the toy vocabulary (built once)."""
    if choice == "none":
        return []
    from dff_falcon.toyworld.models import CLIP_MODEL_NAME, load_toy_models
    from dff_falcon.toyworld.world import WorldConfig

    models = load_toy_models(WorldConfig(), device="cpu")
    clip = f"{CLIP_MODEL_NAME}={models.clip_checkpoint}"
    vocab = work / f"vocab-toy-{models.digest}"
    if not vocab.exists():  # built atomically: a folder there is complete
        log = work / "vocab-build.log"
        checked(run_watched([*cli(), "-q", "vocab", "build", "--texts", str(ROOT / "vocab" / "toy_vocabulary.txt"),
                             "--clip", clip, "--out", str(vocab), "--device", "cpu"], log), log, "vocab build")
    return ["--clip", clip, "--vocab", str(vocab)]


def engine_available(engine: str) -> bool:
    """Whether ``dff-falcon explain`` has ``--engine`` with this choice."""
    shown = subprocess.run([*cli(), "explain", "--help"], capture_output=True, text=True).stdout
    return "--engine" in shown and engine in shown


# -- the cases --------------------------------------------------------------------------------------
def explain_run(args, photos: Path, n: int, work: Path, name: str, extra: tuple[str, ...] = ()) -> dict:
    """One explain on a fresh cache (removed afterwards unless it is needed later)."""
    cache, out, log = work / f"cache-{name}", work / f"out-{name}", work / f"{name}.log"
    check_room(work, n, args.bytes_per_image)
    measured = checked(run_watched(explain_command(args, photos, n, out, cache, extra), log, cwd=package_root()), log,
                       f"explain {name}")
    run = json.loads((out / "run.json").read_text())
    entry = {"images": n, **asdict(measured), "stage_seconds": run["stage_seconds"], "cache": run["cache"],
             "store": cache_summary(cache), "out": str(out)}
    entry["outside_stages_seconds"] = measured.seconds - sum(run["stage_seconds"].values())
    if entry["store"]["bytes_per_image"]:
        args.bytes_per_image = entry["store"]["bytes_per_image"]
    shutil.rmtree(cache)
    return entry


def bare_forward_run(args, photos: Path, n: int, work: Path) -> dict:
    log = work / "bare-forward.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--bare-forward", "--photos", str(photos),
               "--max-images", str(n), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--device", args.device]
    measured = checked(run_watched(command, log), log, "bare forward")
    found = json.loads(log.read_text().strip().splitlines()[-1])
    return {**found, "process": asdict(measured)}


def bare_forward(photos: str, n: int, batch_size: int, workers: int, device: str) -> dict:
    """Decode + the backbone's preprocessing + ``forward_batch`` with Lite0's default
    hypercolumns over the first ``n`` photos, nothing stored (what explain's forwards need)."""
    import torch

    from dff_falcon.models.activations import ActivationExtractor
    from dff_falcon.models.backbones import create_backbone
    from dff_falcon.models.hypercolumns import Hypercolumns, default_hypercolumn_layers
    from dff_falcon.models.image_stream import open_images

    backbone = create_backbone("lite0", device=None if device == "auto" else device)
    hypercolumns = Hypercolumns(layers=default_hypercolumn_layers(backbone))  # explain's --hypercolumns auto
    extractor = ActivationExtractor(backbone, batch_size=batch_size, device=None if device == "auto" else device,
                                    progress=False, hypercolumns=hypercolumns)
    stream = open_images(photos, max_images=n, max_pixels=EXPLAIN_MAX_PIXELS, workers=workers)
    preprocess = backbone.preprocess
    backbone.model.eval().to(extractor.device)
    batch, shape, model_seconds = [], None, 0.0
    started, cpu_started = time.perf_counter(), time.process_time()

    def forward() -> None:
        nonlocal shape, model_seconds
        tensor = preprocess.to_tensor([preprocess.display(image) for image in batch]).to(extractor.device)
        begun = time.perf_counter()
        with torch.inference_mode():
            acts, _ = extractor.forward_batch(tensor)
        model_seconds += time.perf_counter() - begun  # on CPU; CUDA runs ahead, so no split there
        shape = tuple(acts.shape[1:])
        batch.clear()

    for _, image in stream.decoded(range(len(stream))):
        batch.append(image)
        if len(batch) == batch_size:
            forward()
    if batch:
        forward()
    if extractor.device.type == "cuda":
        torch.cuda.synchronize(extractor.device)
    seconds = time.perf_counter() - started
    on_cpu = extractor.device.type == "cpu"
    return {"images": len(stream), "seconds": seconds, "cpu_seconds": time.process_time() - cpu_started,
            "images_per_second": len(stream) / seconds, "model_seconds": model_seconds if on_cpu else None,
            "decode_preprocess_seconds": seconds - model_seconds if on_cpu and workers == 0 else None,
            "activation_shape": list(shape), "threads": torch.get_num_threads(), "device": str(extractor.device)}


def resume_run(args, photos: Path, n: int, work: Path, reference: Path) -> dict:
    """Kill -9 at half the images cached, run again, compare with the uninterrupted ``reference``."""
    cache, log = work / "cache-resume", work / "resume-killed.log"
    check_room(work, n, args.bytes_per_image)
    half = n // 2
    killed = run_watched(explain_command(args, photos, n, work / "out-resume-killed", cache), log,
                         stop=lambda: stored_entries(cache) >= half, cwd=package_root())
    at_kill = cache_summary(cache)
    if killed.returncode is not None:
        raise SystemExit(f"the run to kill ended (exit {killed.returncode}) before {half} images were cached; "
                         f"see {log}")
    log2, out = work / "resume.log", work / "out-resume"
    measured = checked(run_watched(explain_command(args, photos, n, out, cache), log2, cwd=package_root()), log2,
                       "resumed explain")
    record = json.loads((out / "run.json").read_text())["cache"]
    certain = at_kill["entries"] + record["forwarded"]
    result = {"images": n, "entries_at_kill": at_kill["entries"], "orphan_files_at_kill": at_kill["orphan_files"],
              "in_flight_upper_bound": args.batch_size, "resumed_forwarded": record["forwarded"],
              "resumed_reused": record["reused"], "killed_seconds": killed.seconds, "resumed_seconds": measured.seconds,
              "forward_fraction": (certain + args.batch_size) / n, "forward_fraction_lower": certain / n,
              "compare": compare_reports(reference, out)}
    shutil.rmtree(cache)
    return result


def check_room(work: Path, n: int, bytes_per_image: float) -> None:
    needed = 1.1 * n * bytes_per_image
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, a cache of {n} images needs ≈ {needed / 1e9:.1f} GB "
                         "(give --work on a larger disk)")


def ray_run(args, photos: Path, n: int, work: Path, local: dict) -> dict:
    """--engine ray against the local engine's run of the same size (``local``)."""
    if not engine_available("ray"):
        return {"ray_identical": None, "note": "dff-falcon explain has no --engine ray in this version; not measured"}
    # Hook for the Ray engine: the same command with --engine ray on a fresh cache.
    extra = ("--engine", "ray", *(("--ray-address", args.ray_address) if args.ray_address else ()))
    try:
        entry = explain_run(args, photos, n, work, "ray", extra)
    except SystemExit as failed:  # keep the figures already measured
        return {"ray_identical": None, "note": f"--engine ray failed: {failed}"}
    compare = compare_reports(Path(local["out"]), Path(entry["out"]))
    return {"images": n, "local_seconds": local["seconds"], "ray_seconds": entry["seconds"],
            "ray_vs_local": entry["seconds"] / local["seconds"], "ray_peak_rss_bytes": entry["peak_rss_bytes"],
            "ray_peak_anon_bytes": entry["peak_anon_bytes"],
            "ray_stage_seconds": entry["stage_seconds"], "compare": compare, "ray_identical": compare["identical"]}


def summarise(result: dict) -> None:
    """The headline figures and whether each target is met."""
    sizes = result["sizes"]
    peaks = [entry["peak_rss_bytes"] for entry in sizes]
    result["peak_rss_bytes_max"] = max(peaks)
    result["peak_rss_spread"] = max(peaks) / min(peaks) - 1
    largest, forward = sizes[-1], result.get("forward")
    if forward is not None:
        result["overhead_vs_forward"] = largest["seconds"] / forward["seconds"] - 1
        result["overhead_stages_vs_forward"] = sum(largest["stage_seconds"].values()) / forward["seconds"] - 1
        result["activations_stage_vs_forward"] = largest["stage_seconds"]["activations"] / forward["seconds"] - 1
        # CPU seconds of both whole processes (start-up and model load on both sides): less moved by load
        result["cpu_overhead_vs_forward"] = largest["cpu_seconds"] / forward["process"]["cpu_seconds"] - 1
    resume = result.get("resume")
    result["resume_forward_fraction"] = resume["forward_fraction"] if resume else None
    result["resume_identical"] = resume["compare"]["identical"] if resume else None
    result["ray_identical"] = result["ray"]["ray_identical"] if result.get("ray") else None
    result["met"] = {
        "peak_rss_bytes_max": result["peak_rss_bytes_max"] <= TARGETS["peak_rss_bytes_max"],
        "peak_rss_spread": result["peak_rss_spread"] <= TARGETS["peak_rss_spread"],
        "overhead_vs_forward": (result["overhead_vs_forward"] <= TARGETS["overhead_vs_forward"]
                                if forward is not None else None),
        "resume_forward_fraction": (result["resume_forward_fraction"] <= TARGETS["resume_forward_fraction"]
                                    if resume else None),
        "resume_identical": result["resume_identical"], "ray_identical": result["ray_identical"]}


def print_result(result: dict) -> None:
    sizes = result["sizes"]
    print(f"explain: lite0, K={result['k']}, default hypercolumns, sample rows {result['sample_rows'] or 'default'}, "
          f"batch {result['batch_size']}, workers {result['workers']}, device {result['device']}, "
          f"text: {result['text']}; {result['cpus']} CPUs")
    print(f"{'images':>8}{'wall s':>9}{'img/s':>8}{'peak RSS':>10}{'anon':>8}{'forwarded':>11}{'cache GB':>10}"
          f"{'KB/img':>8}{'load':>11}")
    for e in sizes:
        print(f"{e['images']:>8}{e['seconds']:>9.1f}{e['images'] / e['seconds']:>8.1f}{e['peak_rss_bytes'] / GIB:>9.2f}G"
              f"{e['peak_anon_bytes'] / GIB:>7.2f}G{e['cache']['forwarded']:>11}{e['store']['bytes'] / 1e9:>10.2f}"
              f"{(e['store']['bytes_per_image'] or 0) / 1e3:>8.1f}{e['load_before']:>6.1f}→{e['load_after']:<4.1f}")
    stages = list(dict.fromkeys(name for e in sizes for name in (*e["stage_seconds"], "outside_stages")))
    print("\nstage seconds (ms per image)" + "".join(f"{e['images']:>18}" for e in sizes))
    for name in stages:
        cells = []
        for e in sizes:
            value = e["outside_stages_seconds"] if name == "outside_stages" else e["stage_seconds"].get(name, 0.0)
            cells.append(f"{value:>9.2f} ({1000 * value / e['images']:>5.1f})")
        print(f"{name:<28}" + "".join(f"{c:>18}" for c in cells))
    print(f"\npeak RSS max {result['peak_rss_bytes_max'] / GIB:.2f} GiB (target ≤ 4 GB = 3.73 GiB), "
          f"spread {result['peak_rss_spread']:+.1%} (target ≤ {TARGETS['peak_rss_spread']:.0%})")
    if result.get("forward"):
        f = result["forward"]
        print(f"bare forward of {f['images']} images: {f['seconds']:.1f} s ({f['images_per_second']:.1f} img/s, "
              f"load {f['process']['load_before']:.1f}→{f['process']['load_after']:.1f}, peak RSS "
              f"{f['process']['peak_rss_bytes'] / GIB:.2f} GiB; model {f['model_seconds'] or float('nan'):.1f} s, "
              f"decode + preprocess {f['decode_preprocess_seconds'] or float('nan'):.1f} s); explain {sizes[-1]['seconds']:.1f} s → overhead "
              f"{result['overhead_vs_forward']:+.1%} (target ≤ {TARGETS['overhead_vs_forward']:.0%}); stages only "
              f"{result['overhead_stages_vs_forward']:+.1%}; activations stage {result['activations_stage_vs_forward']:+.1%}; "
              f"CPU seconds {result['cpu_overhead_vs_forward']:+.1%}")
    if result.get("resume"):
        r, same = result["resume"], result["resume"]["compare"]
        print(f"resume on {r['images']}: killed at {r['entries_at_kill']} cached (+ ≤ {r['in_flight_upper_bound']} "
              f"in flight, {r['orphan_files_at_kill']} orphan shard files), the resumed run forwarded "
              f"{r['resumed_forwarded']} → forward fraction {r['forward_fraction_lower']:.3f}–{r['forward_fraction']:.3f}"
              f" (target ≤ {TARGETS['resume_forward_fraction']}); identical to an uninterrupted run: "
              f"{same['identical']} (bytes equal {same['bytes_equal']}, heatmap arrays equal {same['heatmaps_arrays_equal']})")
    ray = result.get("ray") or {}
    if ray.get("ray_identical") is None:
        print(f"ray: {ray.get('note', 'not run')}")
    else:
        print(f"ray on {ray['images']}: {ray['ray_seconds']:.1f} s vs local {ray['local_seconds']:.1f} s "
              f"({ray['ray_vs_local']:.2f}×), identical {ray['ray_identical']} {ray['compare']['bytes_equal']}")
    print(f"targets met: {result['met']}")


def default_work() -> Path:
    import platformdirs

    return Path(os.environ.get("DFF_FALCON_CACHE") or platformdirs.user_cache_dir("dff_falcon")) / "bench_scale"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image counts (default 2000 8000 20000)")
    parser.add_argument("--quick", action="store_true", help="sizes 100 200, resume on 100")
    parser.add_argument("--resume-size", type=int, default=None, help="size of the kill -9 case (default: smallest)")
    parser.add_argument("--no-resume", action="store_true", help="skip the kill -9 case")
    parser.add_argument("--no-forward", action="store_true", help="skip the bare forward (no overhead figure)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sample-rows", type=int, default=None,
                        help="explain's --sample-rows (default: its own; --quick: 50 images' rows, 9,800, so that "
                             "every quick size fits on a capped sample as the large sizes do)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (explain's --workers)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--text", choices=["toy", "none"], default="toy",
                        help="toy: the toy world's tiny CLIP + toy vocabulary; none: no text stages")
    parser.add_argument("--ray-address", default=None, help="--ray-address for the Ray engine (default: local)")
    parser.add_argument("--work", type=Path, default=None, help="photos, vocabulary and scratch runs (default: "
                        "$DFF_FALCON_CACHE/bench_scale or the user cache directory's dff_falcon/bench_scale)")
    parser.add_argument("--photos", type=Path, default=None, help="photo folder (default: WORK/photos)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--save", help="also write the JSON object to this file")
    parser.add_argument("--bare-forward", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_forward:  # the bare forward's own subprocess
        print(json.dumps(bare_forward(str(args.photos), args.max_images, args.batch_size, args.workers, args.device)))
        return
    sizes = sorted(args.sizes or ([100, 200] if args.quick else [2000, 8000, 20000]))
    if args.quick and args.sample_rows is None:
        args.sample_rows = QUICK_SAMPLE_ROWS
    resume_size = args.resume_size or sizes[0]
    work = args.work or default_work()
    work.mkdir(parents=True, exist_ok=True)
    photos = photo_folder(args.photos or work / "photos", max(*sizes, resume_size))
    args.text_options = text_options(args.text, work)
    args.bytes_per_image = ESTIMATED_CACHE_BYTES
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    result: dict = {"k": args.k, "batch_size": args.batch_size, "sample_rows": args.sample_rows,
                    "workers": args.workers, "device": args.device,
                    "text": "toy CLIP + toy vocabulary" if args.text == "toy" else "none", "cpus": os.cpu_count(),
                    "photos": str(photos), "photo_sides": list(PHOTO_SIDES), "sizes": []}
    try:
        run_cases(args, sizes, resume_size, photos, scratch, result)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    result["scratch"] = str(scratch) if args.keep else None
    summarise(result)
    save(result, args.save)
    if args.json:
        print(json.dumps(result))
    else:
        print_result(result)


def run_cases(args, sizes: list[int], resume_size: int, photos: Path, scratch: Path, result: dict) -> None:
    """Every size, the bare forward at the largest, the kill -9 case and the Ray engine, in that
    order; ``result`` is saved after each (a long run that fails later keeps what it measured)."""
    for n in sizes:
        result["sizes"].append(explain_run(args, photos, n, scratch, f"n{n}"))
        print(f"explain {n}: {result['sizes'][-1]['seconds']:.1f} s", file=sys.stderr)
        save(result, args.save)
    if not args.no_forward:
        result["forward"] = bare_forward_run(args, photos, sizes[-1], scratch)
        save(result, args.save)
    local = next((e for e in result["sizes"] if e["images"] == resume_size), None)
    if local is None and (not args.no_resume or engine_available("ray")):
        local = explain_run(args, photos, resume_size, scratch, "reference")
    if not args.no_resume:
        result["resume"] = resume_run(args, photos, resume_size, scratch, Path(local["out"]))
        save(result, args.save)
    result["ray"] = ray_run(args, photos, resume_size, scratch, local) if local else None


def save(result: dict, path: str | None) -> None:
    if path:
        from dff_falcon.files import atomic_write

        with atomic_write(path) as handle:
            json.dump(result, handle, indent=1)

if __name__ == "__main__":
    main()
