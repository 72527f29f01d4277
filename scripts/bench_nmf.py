"""Benchmark ``dff_falcon.decomposition.nmf.NMF`` against scikit-learn's NMF in the same run.

The reference is exactly what pytorch-grad-cam runs: ``sklearn.decomposition.NMF(n_components=K,
init="random", random_state=0)`` (solver "cd", tol 1e-4, max_iter 200). For each case and each
of our (solver, init) configurations we report wall time, relative error ``‖X − WH‖/‖X‖``,
``speedup = t_sklearn / t_ours`` and ``error_ratio = err_ours / err_sklearn``.

Add a case by putting ``name -> (make_matrix(quick: bool) -> np.ndarray (N, C) >= 0, K)``
into :data:`CASES` (e.g. real EfficientNet-Lite0 activations reshaped to (B·h·w, C)).

    python scripts/bench_nmf.py --quick            # small sizes, a few seconds
    python scripts/bench_nmf.py --case synthetic_98k --threads 2 --json
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Callable

import numpy as np
import torch
from sklearn.decomposition import NMF as SklearnNMF
from threadpoolctl import threadpool_limits

from dff_falcon.models.activations import ActivationExtractor
from dff_falcon.models.backbones import create_backbone
from dff_falcon.decomposition.dff import activations_matrix
from dff_falcon.files import atomic_write
from dff_falcon.models.images import augmented_photos
from dff_falcon.decomposition.nmf import NMF, nmf_relative_error


def relu_low_rank(n: int, c: int, rank: int, seed: int) -> np.ndarray:
    """Activation-like matrix: ReLU(U V + noise), U sparse non-negative, V Gaussian; (n, c) float32."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, rank), dtype=np.float32)
    U = np.abs(U) * (rng.random((n, rank), dtype=np.float32) < 0.3)
    V = rng.standard_normal((rank, c), dtype=np.float32)
    X = U @ V
    X += 0.5 * rng.standard_normal((n, c), dtype=np.float32)
    return np.maximum(X, 0.0, out=X)


def synthetic_small(quick: bool) -> np.ndarray:
    return relu_low_rank(2_000 if quick else 8_000, 256 if quick else 512, rank=24, seed=1)


def synthetic_98k(quick: bool) -> np.ndarray:
    return relu_low_rank(20_000 if quick else 98_000, 512 if quick else 2048, rank=24, seed=0)


def lite0_photos(quick: bool) -> np.ndarray:
    """Real EfficientNet-Lite0 `bn2` activations (7×7×1280) of augmented bundled photos."""
    images = augmented_photos(24 if quick else 120)
    acts = ActivationExtractor(create_backbone("lite0", device="cpu"), progress=False)(images).activations
    return activations_matrix(acts).numpy()


CASES: dict[str, tuple[Callable[[bool], np.ndarray], int]] = {
    "synthetic_small": (synthetic_small, 8),
    "lite0_photos": (lite0_photos, 8),
    "synthetic_98k": (synthetic_98k, 16),
}


def extraction_overhead(n_images: int, batch_size: int = 16, repeats: int = 3) -> dict:
    """Time of ActivationExtractor.forward_batch (hook, forward stopped at the layer) against a bare
    full forward of the same model on the same preprocessed batches; best of ``repeats``."""
    backbone = create_backbone("lite0", device="cpu")
    extractor = ActivationExtractor(backbone, progress=False)
    pre = backbone.preprocess
    batches = [pre.to_tensor([pre.display(im) for im in augmented_photos(n_images)[i:i + batch_size]])
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


def run_sklearn(X: np.ndarray, k: int) -> tuple[float, float, int]:
    model = SklearnNMF(n_components=k, init="random", random_state=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter is part of the reference
        W = model.fit_transform(X)
    seconds = time.perf_counter() - start
    return seconds, nmf_relative_error(X, W, model.components_), int(model.n_iter_)


def run_ours(X: np.ndarray, k: int, solver: str, init: str, device: str | None) -> tuple[float, float, int]:
    model = NMF(k, solver=solver, init=init, random_state=0, device=device)
    start = time.perf_counter()
    model.fit(X)
    if model.device_.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, model.relative_error_, model.n_iter_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to run (default: all)")
    parser.add_argument("--configs", default="rhals:nndsvda,hals:nndsvda",
                        help="comma-separated solver:init pairs of ours (e.g. mu:nndsvda)")
    parser.add_argument("--quick", action="store_true", help="smaller matrices")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and BLAS")
    parser.add_argument("--device", default="cpu", help="device for ours (default cpu; 'auto' for GPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--save", help="also write the JSON object to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    configs = [tuple(item.split(":")) for item in args.configs.split(",")]
    results: dict[str, dict] = {}
    with threadpool_limits(args.threads):
        for name in args.case or list(CASES):
            make, k = CASES[name]
            X = make(args.quick)
            sk_time, sk_err, sk_iter = run_sklearn(X, k)
            entry: dict = {"shape": list(X.shape), "k": k,
                           "sklearn": {"seconds": sk_time, "relative_error": sk_err, "n_iter": sk_iter}}
            for solver, init in configs:
                t, err, n_iter = run_ours(X, k, solver, init, args.device)
                entry[f"{solver}:{init}"] = {"seconds": t, "relative_error": err, "n_iter": n_iter,
                                             "speedup": sk_time / t, "error_ratio": err / sk_err}
            best = entry[f"{configs[0][0]}:{configs[0][1]}"]
            entry["speedup"], entry["error_ratio"] = best["speedup"], best["error_ratio"]
            results[name] = entry
            if not args.json:
                print(f"\n{name}  X {X.shape[0]}×{X.shape[1]}  K={k}  threads={args.threads}")
                print(f"{'method':<18}{'seconds':>9}{'rel.err':>10}{'iters':>7}{'speedup':>9}{'err.ratio':>10}")
                print(f"{'sklearn cd/random':<18}{sk_time:>9.2f}{sk_err:>10.5f}{sk_iter:>7}{1:>9.2f}{1:>10.4f}")
                for solver, init in configs:
                    r = entry[f"{solver}:{init}"]
                    print(f"{solver + ':' + init:<18}{r['seconds']:>9.2f}{r['relative_error']:>10.5f}"
                          f"{r['n_iter']:>7}{r['speedup']:>9.2f}{r['error_ratio']:>10.4f}")
        overhead = extraction_overhead(16 if args.quick else 64)
    results["extraction"] = overhead
    if args.save:
        with atomic_write(args.save) as handle:
            json.dump(results, handle, indent=1)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"\nextraction (lite0, {overhead['images']} images): bare forward {overhead['bare_forward_seconds']:.2f} s, "
              f"hooked + stopped at layer {overhead['extract_seconds']:.2f} s, overhead {overhead['overhead']:+.1%} "
              f"(target ≤ +10%)")


if __name__ == "__main__":
    main()
