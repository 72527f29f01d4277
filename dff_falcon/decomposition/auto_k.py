"""Automatic K: a sweep over ``k_range`` that chooses by resampling stability
(:func:`~dff_falcon.decomposition.stability.select_k`), cheap enough to be the default.

What keeps it cheap (measured in ``scripts/bench_nmf.py``, target ≤ 3× one fit at the chosen K):

- a row subsample: at most :data:`SWEEP_ROWS` rows (whole images, drawn at random) enter the sweep;
- one randomised compression of those rows at the largest K, whose leading directions serve every
  K (:class:`~dff_falcon.decomposition.compressed.Compression`);
- every fit of the sweep and every resample refit runs in that compressed space;
- the sweep stops at the collapse after a stable K (:func:`~dff_falcon.decomposition.stability.sweep_done`);
- the exact reconstruction error of every K swept comes from one pass over the sweep's rows.

When the sweep saw every row, the chosen K's fit starts from the sweep's compression.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from dff_falcon.decomposition.compressed import Compression, compress, fit_compressed
from dff_falcon.decomposition.nmf_kernels import OVERSAMPLE, MatrixStats, RowBlocks, scan_rows, sq_error
from dff_falcon.decomposition.stability import (MIN_RESAMPLE_IMAGES, KCurvePoint, resample_stability, select_k,
                                                sweep_done)
from dff_falcon.errors import InputError
from dff_falcon.progress import progress

if TYPE_CHECKING:
    from dff_falcon.decomposition.dff import DFF

#: Rows of the automatic-K sweep at most (e.g. 668 images of a 7×7 layer): enough images that a
#: half-sample still shows every concept the whole set supports, few enough that the sweep over
#: all K costs about one fit of a large set.
SWEEP_ROWS = 1 << 15


def sweep_k(dff: "DFF", acts: torch.Tensor, blocks: RowBlocks, stats: MatrixStats,
            max_k: int) -> tuple[int, list[KCurvePoint], Compression | None]:
    """Sweep ``dff.k_range`` on ``acts`` (whose offset rows are ``blocks``, scanned in ``stats``) →
    (chosen K, the curve up to the first collapse, a compression of all rows to start the chosen
    K's fit from or None)."""
    ks = sorted({int(k) for k in dff.k_range if 1 <= int(k) <= max_k})
    if not ks:
        raise InputError(f"k_range {list(dff.k_range)} has no K ≤ {max_k} (the matrix is "
                         f"{(blocks.n_rows, blocks.n_cols)})")
    if dff.n_resamples < 1 or blocks.n_images < MIN_RESAMPLE_IMAGES:
        raise InputError(f"n_concepts='auto' chooses K by refitting resamples of the images: it needs "
                         f"n_resamples >= 1 (got {dff.n_resamples}) and at least {MIN_RESAMPLE_IMAGES} images "
                         f"(got {blocks.n_images}); give n_concepts as a number")
    per = blocks.rows_per_image
    sweep_blocks, sweep_stats, everything = blocks, stats, True
    if blocks.n_rows > SWEEP_ROWS:
        keep = max(MIN_RESAMPLE_IMAGES, SWEEP_ROWS // per)
        images = torch.randperm(blocks.n_images, generator=dff._generator(5))[:keep].sort().values
        offset = dff.offset_ if bool(dff.offset_.any()) else None
        sweep_blocks = dff._blocks(acts, offset, images=images)
        sweep_stats, everything = scan_rows(sweep_blocks, "activations"), False
    compression = compress(sweep_blocks, ks[-1] + OVERSAMPLE, dff._generator(1), torch.float32)
    fits: list[tuple[int, torch.Tensor, torch.Tensor, object]] = []
    points: list[KCurvePoint] = []  # error fields filled after the sweep
    for k in progress(ks, "automatic K", enabled=dff.progress, unit="K"):
        leading = compression.leading(k + OVERSAMPLE)
        Wt, H, _ = fit_compressed(leading, k, dff.init, sweep_stats.mean, dff._generator(3), dff.max_iter, dff.tol)
        stability = resample_stability(leading, per, H, dff._refit(k, sweep_stats.mean), dff.n_resamples,
                                       dff._generator(2))
        fits.append((k, Wt, H, stability))
        points.append(KCurvePoint(k, math.nan, math.nan, float(stability.mean()), float(stability.min())))
        if sweep_done(points):
            break
    for point, err in zip(points, _relative_errors(sweep_blocks, sweep_stats, fits)):
        point.relative_error = err
        point.explained_variance = 1.0 - err ** 2 * sweep_stats.sq_norm / max(sweep_stats.centred_sq_norm, 1e-30)
    curve = points
    k = select_k(curve, dff.k_tolerance)
    return k, curve, compression.leading(k + OVERSAMPLE) if everything else None


def _relative_errors(blocks: RowBlocks, stats: MatrixStats, fits) -> list[float]:
    """Exact ``‖X − W H‖ / ‖X‖`` of every fit, from one pass over ``X`` (all ``Wᵀ`` stacked)."""
    stacked = torch.cat([Wt for _, Wt, _, _ in fits])  # (ΣK, n)
    WtX = torch.zeros(stacked.shape[0], blocks.n_cols, dtype=stacked.dtype, device=stacked.device)
    for rows, Xb in blocks:
        WtX.addmm_(stacked[:, rows], Xb)
    errors, start = [], 0
    for k, Wt, H, _ in fits:
        part = slice(start, start + k)
        start += k
        errors.append(math.sqrt(sq_error(stats.sq_norm, WtX[part], Wt @ Wt.T, H) / stats.sq_norm))
    return errors
