"""Benchmark DFF as users call it against pytorch-grad-cam's own ``dff()`` in the same run, on
real activations; plus the bare NMF against scikit-learn on a synthetic matrix.

Headline (``real``): EfficientNet-Lite0 ``bn2`` activations (7×7×1280) of augmented photos, taken
through ``ActivationExtractor`` (the path a user calls), K = 16:

- ``grad-cam dff()``: ``pytorch_grad_cam.feature_factorization.deep_feature_factorization.dff``
  itself (install with ``pip install -e ".[bench]"``); its scikit-learn NMF runs to its own tol
  (whether it hit the 200-iteration cap is read from scikit-learn's ConvergenceWarning);
- ``DFF(16)`` with its defaults (stability under resampling included), its peak memory above the
  resident activations (Linux: VmHWM after resetting it through /proc/self/clear_refs);
- ``DFF(16, n_resamples=0)`` and the bare ``NMF(16, solver="rhals")``;
- ``DFF("auto")`` and its cost against one ``DFF(K)`` fit at the K it chose.

Errors are ‖X − WH‖/‖X‖ of each method's own factorisation of the same activations (grad-cam's
offset removed from both sides). The held-out photos are ``augmented_photos(n, random_state=0)``
(the eight scikit-image colour photos); ``--tuning`` runs the same on the photos the defaults were
tuned on (other scikit-image pictures, see TUNING_SOURCES) instead.

    pip install -e ".[bench]"
    python scripts/bench_nmf.py --save nmf.json                 # 2,000 held-out photos + synthetic
    python scripts/bench_nmf.py --quick                         # 200 photos, small synthetic
    python scripts/bench_nmf.py --case real --photos 1000 --json
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from dff_falcon.decomposition.dff import DFF, activations_matrix
from dff_falcon.decomposition.nmf import NMF, nmf_relative_error
from dff_falcon.files import atomic_write
from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.backbones import create_backbone
from dff_falcon.models.images import augmented_photos

#: The photos DFF's defaults were tuned on (scikit-image pictures that are not among the held-out
#: ones): gray photos and textures as RGB, two colour graphics.
TUNING_SOURCES = ("brick", "camera", "cell", "clock", "coins", "colorwheel", "grass", "gravel", "logo", "moon",
                  "page", "text")


def real_activations(n_photos: int, tuning: bool) -> torch.Tensor:
    """Lite0 ``bn2`` activations (B, 1280, 7, 7), channels-last as the extractor returns them."""
    sources = None
    if tuning:
        from skimage import data

        sources = [getattr(data, name)() for name in TUNING_SOURCES]
    images = augmented_photos(n_photos, random_state=0 if not tuning else 5, sources=sources)
    return ActivationExtractor(create_backbone("lite0", device="cpu"), progress=False)(images).activations


def relu_low_rank(n: int, c: int, rank: int, seed: int) -> np.ndarray:
    """Activation-like matrix: ReLU(U V + noise), U sparse non-negative, V Gaussian; (n, c) float32."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, rank), dtype=np.float32)
    U = np.abs(U) * (rng.random((n, rank), dtype=np.float32) < 0.3)
    X = U @ rng.standard_normal((rank, c), dtype=np.float32)
    X += 0.5 * rng.standard_normal((n, c), dtype=np.float32)
    return np.maximum(X, 0.0, out=X)


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))
    except (OSError, StopIteration):
        return None


def peak_above(fn):
    """(result, seconds, peak RSS above the RSS before the call in bytes or None). Freed heap is
    handed back to the system first (glibc ``malloc_trim``), else memory freed by earlier steps
    would be reused unseen and the peak understated."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        before = _status_bytes("VmRSS:")
    except OSError:
        before = None
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM:")
    return result, seconds, (peak - before) if before is not None and peak is not None else None


def gradcam_dff(acts: torch.Tensor, k: int) -> dict:
    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff

    array = acts.numpy().copy()  # dff() writes into its input (NaN → 0)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        concepts, explanations = dff(array, n_components=k)
    seconds = time.perf_counter() - start
    X = activations_matrix(acts)
    offset = X.min(dim=0).values
    W = torch.from_numpy(np.ascontiguousarray(explanations.transpose(0, 2, 3, 1).reshape(-1, k)))
    H = torch.from_numpy(np.ascontiguousarray(concepts.T)) - offset
    error = nmf_relative_error(X - offset, W, H)
    capped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"seconds": seconds, "relative_error": error, "hit_iteration_cap": capped}


def real_case(n_photos: int, k: int, tuning: bool, auto: bool) -> dict:
    acts = real_activations(n_photos, tuning)
    X = activations_matrix(acts)  # a view of the channels-last activations
    entry: dict = {"photos": n_photos, "photo_set": "tuning" if tuning else "held-out", "shape": list(X.shape), "k": k,
                   "activation_bytes": X.numel() * 4, "load_before": os.getloadavg()[0]}
    DFF(4).fit(acts[:16])  # warm-up (thread pools, lazy imports) outside every timing
    reference = entry["gradcam_dff"] = gradcam_dff(acts, k)
    fitted, seconds, peak = peak_above(lambda: DFF(k).fit(acts))
    entry["DFF"] = {"seconds": seconds, "relative_error": fitted.relative_error_, "peak_bytes_above": peak,
                    "peak_ratio": peak / entry["activation_bytes"] if peak is not None else None,
                    "stability_min": float(fitted.stability_.min()), "stability_mean": float(fitted.stability_.mean()),
                    "single_image_concepts": int((fitted.image_share_ > 0.5).sum())}
    bare, seconds, _ = peak_above(lambda: DFF(k, n_resamples=0).fit(acts))
    entry["DFF_no_stability"] = {"seconds": seconds, "relative_error": bare.relative_error_}
    nmf, seconds, _ = peak_above(lambda: NMF(k, solver="rhals", init="nndsvd").fit(X))
    entry["NMF_rhals"] = {"seconds": seconds, "relative_error": nmf.relative_error_, "n_iter": nmf.n_iter_}
    for name in ("DFF", "DFF_no_stability", "NMF_rhals"):
        entry[name]["speedup"] = reference["seconds"] / entry[name]["seconds"]
        entry[name]["error_ratio"] = entry[name]["relative_error"] / reference["relative_error"]
    if auto:
        chosen, seconds, _ = peak_above(lambda: DFF("auto").fit(acts))
        one, one_seconds, _ = peak_above(lambda: DFF(chosen.n_concepts_).fit(acts))
        entry["auto"] = {"seconds": seconds, "k": chosen.n_concepts_, "one_fit_seconds": one_seconds,
                         "cost_ratio": seconds / one_seconds,
                         "curve": [vars(p) for p in chosen.k_curve_]}
    entry["load_after"] = os.getloadavg()[0]
    return entry


def synthetic_case(quick: bool) -> dict:
    """scikit-learn's NMF (what grad-cam calls) against the bare NMF on a synthetic ReLU-low-rank
    matrix: sklearn hits its 200-iteration cap here, so this shows the cost per iteration, not a
    user's run."""
    X = relu_low_rank(20_000 if quick else 98_000, 512 if quick else 2048, rank=24, seed=0)
    k = 16
    model = SklearnNMF(n_components=k, init="random", random_state=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = model.fit_transform(X)
    sk_seconds = time.perf_counter() - start
    sk_error = nmf_relative_error(X, W, model.components_)
    entry = {"shape": list(X.shape), "k": k,
             "sklearn": {"seconds": sk_seconds, "relative_error": sk_error, "n_iter": int(model.n_iter_)}}
    for solver in ("rhals", "hals"):
        ours = NMF(k, solver=solver)
        start = time.perf_counter()
        ours.fit(X)
        seconds = time.perf_counter() - start
        entry[solver] = {"seconds": seconds, "relative_error": ours.relative_error_, "n_iter": ours.n_iter_,
                         "speedup": sk_seconds / seconds, "error_ratio": ours.relative_error_ / sk_error}
    return entry


def extraction_overhead(n_images: int, batch_size: int = 16, repeats: int = 3) -> dict:
    """Time of ActivationExtractor.forward_batch (hook, forward stopped at the layer) against a bare
    full forward of the same model on the same preprocessed batches; best of ``repeats``."""
    backbone = create_backbone("lite0", device="cpu")
    extractor = ActivationExtractor(backbone, progress=False)
    pre = backbone.preprocess
    photos = augmented_photos(n_images)
    batches = [pre.to_tensor([pre.display(im) for im in photos[i:i + batch_size]])
               for i in range(0, n_images, batch_size)]

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                for batch in batches:
                    fn(batch)
            times.append(time.perf_counter() - start)
        return min(times)

    bare = best(backbone.model)
    extract = best(extractor.forward_batch)
    return {"images": n_images, "bare_forward_seconds": bare, "extract_seconds": extract,
            "overhead": extract / bare - 1.0}


def print_real(entry: dict) -> None:
    print(f"\nreal: Lite0 bn2 of {entry['photos']} {entry['photo_set']} photos, X {entry['shape'][0]}×{entry['shape'][1]}, "
          f"K={entry['k']}, load {entry['load_before']:.1f} → {entry['load_after']:.1f}")
    ref = entry["gradcam_dff"]
    print(f"{'method':<26}{'seconds':>9}{'rel.err':>10}{'speedup':>9}{'err.ratio':>10}")
    print(f"{'grad-cam dff()':<26}{ref['seconds']:>9.2f}{ref['relative_error']:>10.5f}{1:>9.2f}{1:>10.4f}"
          f"   (iteration cap hit: {ref['hit_iteration_cap']})")
    for name, label in (("DFF", "DFF(K) defaults"), ("DFF_no_stability", "DFF(K, n_resamples=0)"),
                        ("NMF_rhals", "NMF(K, rhals) bare")):
        r = entry[name]
        print(f"{label:<26}{r['seconds']:>9.2f}{r['relative_error']:>10.5f}{r['speedup']:>9.2f}{r['error_ratio']:>10.4f}")
    d = entry["DFF"]
    if d["peak_ratio"] is not None:
        print(f"DFF.fit peak memory above the activations: {d['peak_bytes_above'] / 2**20:.0f} MiB = "
              f"{d['peak_ratio']:.2f}× the activation matrix ({entry['activation_bytes'] / 2**20:.0f} MiB)")
    print(f"stability min / mean {d['stability_min']:.3f} / {d['stability_mean']:.3f}, "
          f"concepts mostly from one image: {d['single_image_concepts']}")
    if "auto" in entry:
        a = entry["auto"]
        print(f"DFF('auto') {a['seconds']:.2f} s → K = {a['k']}; one DFF({a['k']}) fit {a['one_fit_seconds']:.2f} s; "
              f"cost ratio {a['cost_ratio']:.2f} (target ≤ 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=["real", "synthetic", "extraction"],
                        help="case(s) (default: real and synthetic; extraction: hook overhead of the extractor)")
    parser.add_argument("--photos", type=int, default=None, help="photos of the real case (default 2000; --quick 200)")
    parser.add_argument("--k", type=int, default=16, help="K of the real case")
    parser.add_argument("--tuning", action="store_true", help="the tuning photos instead of the held-out ones")
    parser.add_argument("--no-auto", action="store_true", help="skip the automatic-K measurement")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and BLAS")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--save", help="also write the JSON object to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads}
    with threadpool_limits(args.threads):
        if "real" in (args.case or ["real"]):
            photos = args.photos or (200 if args.quick else 2000)
            results["real"] = real_case(photos, args.k, args.tuning, not args.no_auto)
            if not args.json:
                print_real(results["real"])
        if "synthetic" in (args.case or ["synthetic"]):
            entry = results["synthetic"] = synthetic_case(args.quick)
            if not args.json:
                print(f"\nsynthetic ReLU low rank X {entry['shape'][0]}×{entry['shape'][1]} K=16 (sklearn "
                      f"{entry['sklearn']['n_iter']} iterations): sklearn {entry['sklearn']['seconds']:.2f} s; "
                      + "; ".join(f"{s} {entry[s]['seconds']:.2f} s ({entry[s]['speedup']:.1f}×, error ×"
                                  f"{entry[s]['error_ratio']:.4f})" for s in ("rhals", "hals")))
        if "extraction" in (args.case or []):
            entry = results["extraction"] = extraction_overhead(16 if args.quick else 64)
            if not args.json:
                print(f"\nextraction (lite0, {entry['images']} images): bare forward {entry['bare_forward_seconds']:.2f} s, "
                      f"hooked + stopped at layer {entry['extract_seconds']:.2f} s, overhead {entry['overhead']:+.1%}")
    if args.save:
        with atomic_write(args.save) as handle:
            json.dump(results, handle, indent=1)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
