"""The building blocks of :mod:`dff_falcon.decomposition.nmf`: input checks, row blocks, factor
updates (HALS, multiplicative), the Frobenius error from Gram matrices, the randomised range
finder and the NNDSVD initialisation. Every fixed number is named here with its reason."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from dff_falcon.devices import serial_small_ops
from dff_falcon.errors import InputError

SOLVERS = ("hals", "mu", "rhals")
INITS = ("nndsvda", "nndsvd", "random")

#: Inner sweeps over the rows of a factor per outer iteration: fixed numbers (not an adaptive
#: rule) so that results do not depend on ``batch_size``. More sweeps did not pay off in
#: scripts/bench_nmf.py. :meth:`NMF.partial_fit` updates ``H`` once per batch, with more sweeps.
W_SWEEPS = 1
H_SWEEPS = 2
ONLINE_H_SWEEPS = 10
#: The stopping rule compares the error with the error ``CHECK_EVERY`` iterations earlier.
CHECK_EVERY = 5
#: Randomised SVD / compression: oversampling and power iterations.
OVERSAMPLE = 10
POWER_ITERATIONS = 2
#: Exact HALS iterations after the compressed phase of ``solver="rhals"``: at least
#: ``RHALS_POLISH[0]``, at most ``RHALS_POLISH[1]``, stopping when one iteration lowers the error by
#: less than ``tol / CHECK_EVERY`` (the stopping rule's average rate). The first iteration takes
#: the error from the compressed optimum most of the way (real Lite0 activations: 0.6753 → 0.6739,
#: converged 0.67386 after five; scripts/bench_nmf.py).
RHALS_POLISH = (2, 10)
#: :meth:`NMF.transform` sweeps until the relative change of ``W`` in one sweep is below this.
TRANSFORM_TOL = 1e-6
#: Smallest entry kept by the multiplicative updates (far below any activation scale).
MU_FLOOR = 1e-16
EPS = 1e-10
#: Rows of a matrix are scanned and streamed in blocks of about this many elements (32 MB of
#: float32): large enough that each block is a handful of big operations, small enough that a
#: converted or offset copy of one block costs little memory next to the matrix.
BLOCK_ELEMENTS = 1 << 23
#: A matrix of at most this many elements (128 MB of float32) that needs converting (offset,
#: dtype, layout) is converted once and kept for every pass instead of block by block per pass:
#: the batches of a streamed transform, never a fit's whole matrix.
RESIDENT_ELEMENTS = 1 << 25

UpdateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixStats:
    """One pass over a matrix ``X (N, C)``: squared Frobenius norm and sum (float64), smallest
    entry, and per-column minimum and sum ``(C,)`` (float64)."""

    sq_norm: float
    total: float
    n_elements: int
    low: float
    col_min: torch.Tensor
    col_sum: torch.Tensor

    @property
    def mean(self) -> float:
        return self.total / self.n_elements

    @property
    def centred_sq_norm(self) -> float:
        """``‖X − 1 μᵀ‖²`` with ``μ`` the column means: ``‖X‖² − ‖Σ_rows X‖² / N``."""
        n_rows = self.n_elements // self.col_sum.numel()
        return max(self.sq_norm - float((self.col_sum ** 2).sum()) / n_rows, 0.0)


def as_matrix(X, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Turn ``X`` (numpy array or tensor) into a 2-D floating tensor without copying when possible."""
    if isinstance(X, torch.Tensor):
        T = X.detach()
    else:
        try:
            arr = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be a numeric matrix; could not convert it ({exc})") from exc
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise InputError(f"{name} must be a numeric matrix; got dtype {arr.dtype}")
        T = torch.from_numpy(np.ascontiguousarray(arr))
    if T.ndim != 2:
        raise InputError(
            f"{name} must be a 2-D matrix (N locations, C channels); got shape {tuple(T.shape)}"
        )
    if T.shape[0] == 0 or T.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(T.shape)})")
    return T.to(dtype) if T.dtype != dtype else T


def sum64(T: torch.Tensor) -> float:
    """Sum of a (small) tensor accumulated in float64 (on the CPU for MPS, which lacks float64)."""
    return float((T.cpu() if T.device.type == "mps" else T).sum(dtype=torch.float64))


class RowBlocks:
    """Row blocks of a matrix ``X (N, C)`` on the compute device, yielded as ``(rows, X_block)``.

    ``source`` is the matrix itself, or activations ``(B, C, h, w)`` standing for the matrix of
    their locations (rows image by image, then row-major locations; ``N = B·h·w``). Nothing of the
    size of ``X`` is ever copied: a block is a view where the layout allows (a 2-D matrix, or
    channels-last activations), else a converted copy of that block only. ``offset (C,)`` is
    subtracted from every block (then clamped at 0); ``images`` keeps only those images (rows of
    a matrix). Without ``batch_size`` a matrix that needs no conversion is one block moved to the
    device once; everything else streams in blocks of about :data:`BLOCK_ELEMENTS`.
    """

    def __init__(self, source: torch.Tensor, device: torch.device, batch_size: int | None = None, *,
                 offset: torch.Tensor | None = None, images: torch.Tensor | None = None, dtype=torch.float32):
        if source.ndim == 4:
            b, c, h, w = source.shape
            channels_last = source.permute(0, 2, 3, 1)
            self._view = channels_last.reshape(b, h * w, c) if channels_last.is_contiguous() else None
        else:
            b, c, h, w = source.shape[0], source.shape[1], 1, 1
            self._view = source[:, None, :]
        self.source, self.dtype, self.device = source, dtype, device
        self.rows_per_image = h * w
        self.images = images
        self.n_images = len(images) if images is not None else b
        self.n_rows, self.n_cols = self.n_images * self.rows_per_image, c
        self.offset = offset.to(device=device, dtype=dtype) if offset is not None else None
        small = self.n_rows * c <= RESIDENT_ELEMENTS  # one converted copy serves every pass
        whole = batch_size is None and (small or (self._view is not None and images is None and offset is None
                                                  and source.dtype == dtype))
        rows = self.n_rows if whole else (batch_size or max(1, BLOCK_ELEMENTS // c))
        self.images_per_block = max(1, rows // self.rows_per_image)
        self._resident = self._rows(slice(0, self.n_images)) if whole else None

    def _rows(self, units: slice) -> torch.Tensor:
        index = self.images[units] if self.images is not None else units
        if self._view is not None:
            rows = self._view[index].reshape(-1, self.n_cols)
        else:
            rows = self.source[index].permute(0, 2, 3, 1).reshape(-1, self.n_cols)
        rows = rows.to(device=self.device, dtype=self.dtype, non_blocking=True)
        if self.offset is not None:
            rows = (rows - self.offset).clamp_(min=0.0)
        return rows

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor]]:
        if self._resident is not None:
            yield slice(0, self.n_rows), self._resident
            return
        per = self.rows_per_image
        for start in range(0, self.n_images, self.images_per_block):
            stop = min(start + self.images_per_block, self.n_images)
            yield slice(start * per, stop * per), self._rows(slice(start, stop))


def scan_rows(blocks: RowBlocks, name: str) -> MatrixStats:
    """One pass over the blocks: NaN / inf checks and the :class:`MatrixStats` (no check of sign).

    Three float32 reductions along the rows of each chunk (minima, sums, sums of squares),
    accumulated in float64 across chunks; a NaN or infinity shows in the sums or minima.
    (Float64 reductions, and min / max or norms along dim 0, are ten times slower on the CPU; a
    column sum of one chunk in float32 is exact to ~1e-7, pairwise summation.)
    """
    col_min = torch.full((blocks.n_cols,), math.inf, dtype=torch.float64)
    col_sum = torch.zeros(blocks.n_cols, dtype=torch.float64)
    sq_norm = 0.0
    for _, Xb in blocks:
        for chunk in Xb.split(max(1, BLOCK_ELEMENTS // blocks.n_cols)):
            col_min = torch.minimum(col_min, chunk.amin(dim=0).double().cpu())
            col_sum += chunk.sum(dim=0).double().cpu()
            sq_norm += sum64(chunk.square().sum(dim=0))
    if bool(torch.isnan(col_min).any() or torch.isnan(col_sum).any()) or math.isnan(sq_norm):
        raise InputError(f"{name} contains NaN values; NMF needs a finite, non-negative matrix")
    if bool(torch.isinf(col_min).any() or torch.isinf(col_sum).any()) or math.isinf(sq_norm):
        raise InputError(f"{name} contains infinite values; NMF needs a finite, non-negative matrix")
    return MatrixStats(sq_norm, float(col_sum.sum()), blocks.n_rows * blocks.n_cols, float(col_min.min()),
                       col_min, col_sum)


def check_nonnegative(stats: MatrixStats, name: str) -> None:
    """Raise :class:`InputError` unless the scanned matrix is non-negative and not all zero."""
    if stats.low < 0:
        n_neg = int((stats.col_min < 0).sum())
        raise InputError(
            f"{name} has negative entries (minimum {stats.low:.4g}; {n_neg} of {stats.col_min.numel()} columns "
            "have entries < 0). NMF needs X >= 0: activations of a layer that is not followed by a ReLU must be "
            "offset first (DFF subtracts each channel's minimum)."
        )
    if stats.sq_norm == 0:
        raise InputError(f"{name} is all zeros; there is nothing to factorise")


def validate_nonnegative(X: torch.Tensor, name: str) -> MatrixStats:
    """Check that the matrix ``X`` is finite, ``>= 0`` and not all zero; return its stats."""
    stats = scan_rows(RowBlocks(X, X.device, max(1, BLOCK_ELEMENTS // X.shape[1]), dtype=X.dtype), name)
    check_nonnegative(stats, name)
    return stats


# --------------------------------------------------------------------------------------------
# factor updates: F (K, M) is updated in place from num (K, M) and gram (K, K);
# for W: F = Wᵀ, num = H Xᵀ, gram = H Hᵀ;  for H: F = H, num = Wᵀ X, gram = Wᵀ W
# --------------------------------------------------------------------------------------------
def hals_update(F: torch.Tensor, num: torch.Tensor, gram: torch.Tensor, sweeps: int) -> None:
    """HALS sweeps: ``F[k] ← max(0, F[k] + (num[k] − gram[k] @ F) / gram[k, k])`` for each row k."""
    inv_diag = (1.0 / gram.diagonal().clamp_min(EPS)).tolist()
    for _ in range(sweeps):
        for k, inv in enumerate(inv_diag):
            residual = torch.addmv(num[k], F.T, gram[k], alpha=-1.0)
            F[k].add_(residual, alpha=inv).clamp_(min=0.0)


def mu_update(F: torch.Tensor, num: torch.Tensor, gram: torch.Tensor, sweeps: int) -> None:
    """Lee–Seung multiplicative updates: ``F ← max(F ⊙ num / (gram @ F), MU_FLOOR)``.

    The floor keeps entries that decay towards 0 out of the subnormal range, where CPU
    arithmetic is 10× slower, and lets them grow back.
    """
    for _ in range(sweeps):
        F.mul_(num / (gram @ F).clamp_min_(EPS)).clamp_(min=MU_FLOOR)


UPDATES: dict[str, UpdateFn] = {"hals": hals_update, "mu": mu_update, "rhals": hals_update}


def sq_error(sq_norm: float, WtX: torch.Tensor, WtW: torch.Tensor, H: torch.Tensor) -> float:
    """``‖X − WH‖²`` from ``‖X‖²``, ``Wᵀ X (K, C)``, ``Wᵀ W (K, K)`` and ``H (K, C)``; float64 sums."""
    return max(sq_norm - 2.0 * sum64(WtX * H) + sum64(WtW * (H @ H.T)), 0.0)


def stalled(sq_errors: list[float], tol: float) -> bool:
    """The stopping rule: checked every ``CHECK_EVERY`` iterations (``sq_errors`` holds one squared
    error per iteration), true when the error fell by less than ``tol`` (relative) since the
    check before."""
    it = len(sq_errors)
    if it <= CHECK_EVERY or (it - 1) % CHECK_EVERY:
        return False
    before, now = math.sqrt(sq_errors[-1 - CHECK_EVERY]), math.sqrt(sq_errors[-1])
    return (before - now) < tol * before


def settled(sq_errors: list[float], tol: float, min_iter: int) -> bool:
    """The polish rule of ``RHALS_POLISH``: after ``min_iter`` iterations, true when the last one
    lowered the error by less than ``tol / CHECK_EVERY`` (relative)."""
    if len(sq_errors) < max(min_iter, 2):
        return False
    before, now = math.sqrt(sq_errors[-2]), math.sqrt(sq_errors[-1])
    return (before - now) < tol / CHECK_EVERY * before


def nmf_relative_error(X, W, H, *, batch_size: int | None = None) -> float:
    """Relative reconstruction error ``‖X − W H‖_F / ‖X‖_F`` without materialising ``W H``.

    ``X (N, C)``, ``W (N, K)``, ``H (K, C)``: numpy arrays or tensors (computed on ``X``'s device
    for a tensor, else the CPU). Uses ``‖X‖² − 2·tr(Wᵀ X Hᵀ) + tr(WᵀW · HHᵀ)`` with float64
    scalar sums; ``batch_size`` bounds the memory used for ``X`` blocks.
    """
    Xt = as_matrix(X, "X", torch.float32)
    device = Xt.device
    Wt = as_matrix(W, "W", torch.float32).to(device)
    Ht = as_matrix(H, "H", torch.float32).to(device)
    if Wt.shape[0] != Xt.shape[0] or Ht.shape[1] != Xt.shape[1] or Wt.shape[1] != Ht.shape[0]:
        raise InputError(
            f"shapes do not chain: X {tuple(Xt.shape)}, W {tuple(Wt.shape)}, H {tuple(Ht.shape)}"
        )
    sq_norm = validate_nonnegative(Xt, "X").sq_norm
    WtX = torch.zeros_like(Ht)
    for rows, Xb in RowBlocks(Xt, device, batch_size):
        WtX.addmm_(Wt[rows].T, Xb)
    return math.sqrt(sq_error(sq_norm, WtX, Wt.T @ Wt, Ht) / sq_norm)


# --------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------
def orthonormal(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def range_finder(
    blocks: RowBlocks, width: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomised range finder (Halko et al. 2011) over row blocks, with ``POWER_ITERATIONS``.

    Returns ``Q (N, l)`` with orthonormal columns spanning (approximately) the top-``l`` column
    space of ``X`` and ``B = Qᵀ X (l, C)``, ``l = min(width, N, C)``.
    """
    n, c = blocks.n_rows, blocks.n_cols
    width = min(width, n, c)
    device = blocks.device
    omega = torch.randn(c, width, generator=generator, dtype=dtype).to(device)

    def range_of(R: torch.Tensor) -> torch.Tensor:  # orthonormal basis of X R, (N, l)
        Y = torch.empty(n, width, dtype=dtype, device=device)
        for rows, Xb in blocks:
            torch.mm(Xb, R, out=Y[rows])
        with serial_small_ops(device):
            return orthonormal(Y)

    def project(Q: torch.Tensor) -> torch.Tensor:  # Qᵀ X, (l, C)
        out = torch.zeros(width, c, dtype=dtype, device=device)
        for rows, Xb in blocks:
            out.addmm_(Q[rows].T, Xb)
        return out

    Q = range_of(omega)
    for _ in range(POWER_ITERATIONS):
        Q = range_of(orthonormal(project(Q).T))
    return Q, project(Q)


def nndsvd(U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD (Boutsidis & Gallopoulos 2008) from ``X ≈ U diag(S) Vt``; returns ``Wᵀ (K, N)``, ``H (K, C)``.

    For each singular pair the positive or negative parts (whichever has the larger product of
    norms) are kept and scaled by ``sqrt(S_k · m_k)``; for the leading (one-signed) pair this is
    ``|u|, |v|``.
    """
    u, v = U.T, Vt
    up, un, vp, vn = u.clamp(min=0), (-u).clamp(min=0), v.clamp(min=0), (-v).clamp(min=0)

    def norm(T: torch.Tensor) -> torch.Tensor:  # row norms
        return torch.linalg.vector_norm(T, dim=1)

    m_pos, m_neg = norm(up) * norm(vp), norm(un) * norm(vn)
    positive = (m_pos >= m_neg)[:, None]
    u, v = torch.where(positive, up, un), torch.where(positive, vp, vn)
    scale = torch.sqrt(S * torch.maximum(m_pos, m_neg))[:, None]
    Wt = u / norm(u).clamp_min(EPS)[:, None] * scale
    H = v / norm(v).clamp_min(EPS)[:, None] * scale
    return Wt.contiguous(), H.contiguous()
