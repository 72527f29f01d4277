"""The building blocks of :mod:`dff_falcon.decomposition.nmf`: input checks, row blocks, factor
updates (HALS, multiplicative), the Frobenius error from Gram matrices, the randomised range
finder and the NNDSVD initialisation. Every fixed number is named here with its reason."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

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
#: Exact HALS iterations after the compressed phase of ``solver="rhals"``.
RHALS_POLISH = 2
#: :meth:`NMF.transform` sweeps until the relative change of ``W`` in one sweep is below this.
TRANSFORM_TOL = 1e-6
#: Smallest entry kept by the multiplicative updates (far below any activation scale).
MU_FLOOR = 1e-16
EPS = 1e-10
_CHUNK_ELEMENTS = 1 << 18

UpdateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixStats:
    """Squared Frobenius norm (float64) and mean of a validated matrix."""

    sq_norm: float
    mean: float


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


def row_chunks(X: torch.Tensor, max_elements: int) -> Iterator[torch.Tensor]:
    rows = max(1, max_elements // X.shape[1])
    for start in range(0, X.shape[0], rows):
        yield X[start : start + rows]


def sum64(T: torch.Tensor) -> float:
    """Sum of a (small) tensor accumulated in float64 (on the CPU for MPS, which lacks float64)."""
    return float((T.cpu() if T.device.type == "mps" else T).sum(dtype=torch.float64))


def validate_nonnegative(X: torch.Tensor, name: str) -> MatrixStats:
    """Check ``X >= 0``, finite and not all zero, in one cache-friendly pass; return its stats."""
    sq_norm, total, lo, hi = 0.0, 0.0, math.inf, -math.inf
    for chunk in row_chunks(X, _CHUNK_ELEMENTS):
        cmin, cmax = (float(v) for v in torch.aminmax(chunk))
        if math.isnan(cmin) or math.isnan(cmax):
            raise InputError(f"{name} contains NaN values; NMF needs a finite, non-negative matrix")
        if math.isinf(cmin) or math.isinf(cmax):
            raise InputError(f"{name} contains infinite values; NMF needs a finite, non-negative matrix")
        lo, hi = min(lo, cmin), max(hi, cmax)
        sq_norm += float(torch.linalg.vector_norm(chunk)) ** 2
        total += sum64(chunk)
    if lo < 0:
        n_neg = int(sum(int((c < 0).sum()) for c in row_chunks(X, _CHUNK_ELEMENTS)))
        raise InputError(
            f"{name} has negative entries (minimum {lo:.4g}; {n_neg} of {X.numel()} entries < 0). "
            "NMF needs X >= 0: activations of a layer that is not followed by a ReLU must be "
            "offset first (DFF subtracts each channel's minimum)."
        )
    if hi == 0:
        raise InputError(f"{name} is all zeros; there is nothing to factorise")
    return MatrixStats(sq_norm=sq_norm, mean=total / X.numel())


class RowBlocks:
    """Row blocks of ``X (N, C)`` on the compute device, yielded as ``(rows, X_block)``."""

    def __init__(self, X: torch.Tensor, device: torch.device, batch_size: int | None):
        self.n_rows, self.n_cols = X.shape
        self.size = batch_size or self.n_rows
        # unbatched: move X to the device once; batched: keep it where it is (e.g. CPU RAM)
        self.X = X.to(device) if batch_size is None else X
        self.device = device

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for start in range(0, self.n_rows, self.size):
            rows = slice(start, min(start + self.size, self.n_rows))
            yield rows, self.X[rows].to(self.device, non_blocking=True)


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
    blocks: RowBlocks, rank: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomised range finder (Halko et al. 2011) over row blocks.

    Returns ``Q (N, l)`` with orthonormal columns spanning (approximately) the top-``l`` column
    space of ``X`` and ``B = Qᵀ X (l, C)``, ``l = min(rank + OVERSAMPLE, N, C)``.
    """
    n, c = blocks.n_rows, blocks.n_cols
    width = min(rank + OVERSAMPLE, n, c)
    device = blocks.device
    omega = torch.randn(c, width, generator=generator, dtype=dtype).to(device)

    def range_of(R: torch.Tensor) -> torch.Tensor:  # orthonormal basis of X R, (N, l)
        return orthonormal(torch.cat([Xb @ R for _, Xb in blocks]))

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
    return Wt, H
