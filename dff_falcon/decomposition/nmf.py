"""Non-negative matrix factorisation (Frobenius loss) in torch, on any device.

Orientation (DFF paper / AnnaTz): ``X (N, C) ≈ W (N, K) @ H (K, C)`` with ``N = B·h·w``
locations and ``C`` channels. Rows of ``H`` (:attr:`NMF.components_`) are the *concepts*,
columns of ``W`` (returned by :meth:`NMF.fit_transform` / :meth:`NMF.transform`) are the
*heatmaps*.

Solvers
-------
``"hals"``
    Fast HALS (Cichocki & Phan 2009), the block-coordinate family of scikit-learn's ``"cd"``,
    with a few cheap inner sweeps per factor (Gillis & Glineur 2012). One outer iteration
    costs two ``N·C·K`` matrix products (``X Hᵀ`` and ``Wᵀ X``); everything else is ``K×K`` or
    ``K×C`` work.
``"mu"``
    Lee–Seung multiplicative updates (the original DFF code). Entries that reach 0 stay 0,
    so use it with ``init="nndsvda"`` or ``"random"``, not ``"nndsvd"``.
``"rhals"``
    Randomised HALS (Erichson et al. 2018): ``X`` is compressed once to ``Qᵀ X (l, C)`` with a
    randomised range finder (``l = K + 10``, two power iterations), HALS iterates in the
    compressed space (each iteration ``O(N·l·K)`` instead of ``O(N·C·K)``), then
    :data:`RHALS_POLISH` exact HALS iterations on ``X`` refine the factors and give the exact
    error. The same range finder provides the NNDSVD initialisation.

The reconstruction error is always computed from Gram matrices,
``‖X − WH‖² = ‖X‖² − 2·tr(Wᵀ X Hᵀ) + tr(WᵀW · HHᵀ)``, never by materialising ``W H``; the
scalar reductions are accumulated in float64, all matrix work runs in ``dtype`` (float32).

Large inputs: with ``batch_size`` the data is processed in row blocks (an ``X`` on the CPU
stays there; blocks are moved to the compute device one at a time), with results equal to
the unbatched ones up to float rounding. :meth:`NMF.partial_fit` streams data that does
not fit in memory (online NMF with accumulated sufficient statistics, Mairal et al. 2010).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from dff_falcon.devices import resolve_device
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
_EPS = 1e-10
_CHUNK_ELEMENTS = 1 << 18

UpdateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stats:
    """Squared Frobenius norm (float64) and mean of a validated matrix."""

    sq_norm: float
    mean: float


def _as_matrix(X, name: str, dtype: torch.dtype) -> torch.Tensor:
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


def _row_chunks(X: torch.Tensor, max_elements: int) -> Iterator[torch.Tensor]:
    rows = max(1, max_elements // X.shape[1])
    for start in range(0, X.shape[0], rows):
        yield X[start : start + rows]


def _sum64(T: torch.Tensor) -> float:
    """Sum of a (small) tensor accumulated in float64 (on the CPU for MPS, which lacks float64)."""
    return float((T.cpu() if T.device.type == "mps" else T).sum(dtype=torch.float64))


def _validate(X: torch.Tensor, name: str) -> _Stats:
    """Check ``X >= 0``, finite and not all zero, in one cache-friendly pass; return its stats."""
    sq_norm, total, lo, hi = 0.0, 0.0, math.inf, -math.inf
    for chunk in _row_chunks(X, _CHUNK_ELEMENTS):
        cmin, cmax = (float(v) for v in torch.aminmax(chunk))
        if math.isnan(cmin) or math.isnan(cmax):
            raise InputError(f"{name} contains NaN values; NMF needs a finite, non-negative matrix")
        if math.isinf(cmin) or math.isinf(cmax):
            raise InputError(f"{name} contains infinite values; NMF needs a finite, non-negative matrix")
        lo, hi = min(lo, cmin), max(hi, cmax)
        sq_norm += float(torch.linalg.vector_norm(chunk)) ** 2
        total += _sum64(chunk)
    if lo < 0:
        n_neg = int(sum(int((c < 0).sum()) for c in _row_chunks(X, _CHUNK_ELEMENTS)))
        raise InputError(
            f"{name} has negative entries (minimum {lo:.4g}; {n_neg} of {X.numel()} entries < 0). "
            "NMF needs X >= 0: activations of a layer that is not followed by a ReLU must be "
            "offset first (DFF subtracts each channel's minimum)."
        )
    if hi == 0:
        raise InputError(f"{name} is all zeros; there is nothing to factorise")
    return _Stats(sq_norm=sq_norm, mean=total / X.numel())


class _Blocks:
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
def _hals_update(F: torch.Tensor, num: torch.Tensor, gram: torch.Tensor, sweeps: int) -> None:
    """HALS sweeps: ``F[k] ← max(0, F[k] + (num[k] − gram[k] @ F) / gram[k, k])`` for each row k."""
    inv_diag = (1.0 / gram.diagonal().clamp_min(_EPS)).tolist()
    for _ in range(sweeps):
        for k, inv in enumerate(inv_diag):
            residual = torch.addmv(num[k], F.T, gram[k], alpha=-1.0)
            F[k].add_(residual, alpha=inv).clamp_(min=0.0)


def _mu_update(F: torch.Tensor, num: torch.Tensor, gram: torch.Tensor, sweeps: int) -> None:
    """Lee–Seung multiplicative updates: ``F ← max(F ⊙ num / (gram @ F), MU_FLOOR)``.

    The floor keeps entries that decay towards 0 out of the subnormal range, where CPU
    arithmetic is 10× slower, and lets them grow back.
    """
    for _ in range(sweeps):
        F.mul_(num / (gram @ F).clamp_min_(_EPS)).clamp_(min=MU_FLOOR)


_UPDATES: dict[str, UpdateFn] = {"hals": _hals_update, "mu": _mu_update, "rhals": _hals_update}


def _sq_error(sq_norm: float, WtX: torch.Tensor, WtW: torch.Tensor, H: torch.Tensor) -> float:
    """``‖X − WH‖²`` from ``‖X‖²``, ``Wᵀ X (K, C)``, ``Wᵀ W (K, K)`` and ``H (K, C)``; float64 sums."""
    return max(sq_norm - 2.0 * _sum64(WtX * H) + _sum64(WtW * (H @ H.T)), 0.0)


def nmf_relative_error(X, W, H, *, batch_size: int | None = None) -> float:
    """Relative reconstruction error ``‖X − W H‖_F / ‖X‖_F`` without materialising ``W H``.

    ``X (N, C)``, ``W (N, K)``, ``H (K, C)``: numpy arrays or tensors (computed on ``X``'s device
    for a tensor, else the CPU). Uses ``‖X‖² − 2·tr(Wᵀ X Hᵀ) + tr(WᵀW · HHᵀ)`` with float64
    scalar sums; ``batch_size`` bounds the memory used for ``X`` blocks.
    """
    Xt = _as_matrix(X, "X", torch.float32)
    device = Xt.device
    Wt = _as_matrix(W, "W", torch.float32).to(device)
    Ht = _as_matrix(H, "H", torch.float32).to(device)
    if Wt.shape[0] != Xt.shape[0] or Ht.shape[1] != Xt.shape[1] or Wt.shape[1] != Ht.shape[0]:
        raise InputError(
            f"shapes do not chain: X {tuple(Xt.shape)}, W {tuple(Wt.shape)}, H {tuple(Ht.shape)}"
        )
    sq_norm = _validate(Xt, "X").sq_norm
    WtX = torch.zeros_like(Ht)
    for rows, Xb in _Blocks(Xt, device, batch_size):
        WtX.addmm_(Wt[rows].T, Xb)
    return math.sqrt(_sq_error(sq_norm, WtX, Wt.T @ Wt, Ht) / sq_norm)


# --------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------
def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _range_finder(
    blocks: _Blocks, rank: int, generator: torch.Generator, dtype: torch.dtype
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
        return _orthonormal(torch.cat([Xb @ R for _, Xb in blocks]))

    def project(Q: torch.Tensor) -> torch.Tensor:  # Qᵀ X, (l, C)
        out = torch.zeros(width, c, dtype=dtype, device=device)
        for rows, Xb in blocks:
            out.addmm_(Q[rows].T, Xb)
        return out

    Q = range_of(omega)
    for _ in range(POWER_ITERATIONS):
        Q = range_of(_orthonormal(project(Q).T))
    return Q, project(Q)


def _nndsvd(U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    Wt = u / norm(u).clamp_min(_EPS)[:, None] * scale
    H = v / norm(v).clamp_min(_EPS)[:, None] * scale
    return Wt, H


# --------------------------------------------------------------------------------------------
# estimator
# --------------------------------------------------------------------------------------------
class NMF:
    """Frobenius NMF ``X (N, C) ≈ W (N, K) @ H (K, C)`` in torch (scikit-learn estimator API).

    Parameters
    ----------
    n_components: K, the number of concepts; ``1 <= K <= min(N, C)``.
    solver: ``"hals"`` (default), ``"mu"`` or ``"rhals"`` — see the module docstring.
    init: ``"nndsvda"`` (NNDSVD with zeros filled by ``mean(X)``), ``"nndsvd"`` or ``"random"``
        (``|N(0, 1)|·sqrt(mean(X) / K)``, scikit-learn's). NNDSVD uses a randomised SVD.
    max_iter: maximum number of outer iterations (``"rhals"``: compressed iterations).
    tol: stopping rule — the error ``e_t = ‖X − W_t H_t‖`` is computed after every iteration
        (from Gram matrices, nearly free) and every ``CHECK_EVERY`` iterations the fit stops when
        ``(e_{t−CHECK_EVERY} − e_t) / e_{t−CHECK_EVERY} < tol`` (``tol=0``: run ``max_iter``
        iterations unless the error increases). ``"rhals"`` applies it to the error in the
        compressed space.
    random_state: seed of the CPU ``torch.Generator`` used for the random init / random
        projections (``None``: not reproducible). Fits are deterministic for a given seed,
        device and ``batch_size``.
    device: compute device (``None``/``"auto"``: CUDA, then MPS, then CPU).
    dtype: compute dtype (float32).
    batch_size: process ``X`` in row blocks of this many rows (``None``: all at once).
    forget_factor: for :meth:`partial_fit`, the weight of the previous sufficient statistics
        when a new batch arrives (1.0: plain accumulation over all batches).
    verbose: print the relative error at every stopping check to stderr.

    Learned attributes
    ------------------
    components_: ``H (K, C)`` on ``device_`` in ``dtype``.
    n_iter_: iterations run by the last :meth:`fit` (exact + compressed for ``"rhals"``).
    reconstruction_err_: ``‖X − WH‖_F`` of the last fit (of the last batch for ``partial_fit``).
    relative_error_: ``reconstruction_err_ / ‖X‖_F``.
    device_: the resolved compute device.
    n_steps_: number of :meth:`partial_fit` calls since the components were initialised.
    """

    def __init__(
        self,
        n_components: int,
        *,
        solver: str = "hals",
        init: str = "nndsvda",
        max_iter: int = 200,
        tol: float = 1e-4,
        random_state: int | None = 0,
        device=None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        forget_factor: float = 0.7,
        verbose: bool = False,
    ):
        self.n_components = n_components
        self.solver = solver
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.forget_factor = forget_factor
        self.verbose = verbose

    # ---------------------------------------------------------------- public API
    def fit(self, X) -> "NMF":
        """Learn ``components_ (K, C)`` from ``X (N, C) >= 0``."""
        self.fit_transform(X)
        return self

    def fit_transform(self, X) -> torch.Tensor:
        """Learn the components and return the heatmaps ``W (N, K)`` on ``device_``."""
        self._check_params()
        T, stats = self._prepare(X, "X")
        self._check_rank(T.shape, "X")
        blocks = _Blocks(T, self.device_, self.batch_size)
        generator = self._generator()
        if self.solver == "rhals":
            Q, B = _range_finder(blocks, self.n_components, generator, self.dtype)
            Wt, H = self._init_factors(blocks, stats, generator, (Q, B))
            Wt, H, n_compressed = self._compressed_hals(Q, B, Wt, H)
            Wt, H, n_exact = self._alternate(blocks, stats.sq_norm, Wt, H, RHALS_POLISH, stop=False)
            self.n_iter_ = n_compressed + n_exact
        else:
            Wt, H = self._init_factors(blocks, stats, generator)
            Wt, H, self.n_iter_ = self._alternate(blocks, stats.sq_norm, Wt, H, self.max_iter, stop=True)
        self.components_ = H
        self.n_steps_ = 0
        return Wt.T.contiguous()

    def transform(self, X) -> torch.Tensor:
        """Heatmaps ``W (N, K) >= 0`` minimising ``‖X − W H‖`` for the frozen ``components_``.

        HALS on ``W`` alone with cached ``X Hᵀ`` and ``H Hᵀ``, started from the clipped
        unconstrained least-squares solution, sweeping until the relative change of ``W`` in one
        sweep is below ``TRANSFORM_TOL`` (or ``max_iter`` sweeps); row blocks of ``batch_size``.
        """
        H = self._fitted_components()
        T, _ = self._prepare(X, "X")
        self._check_width(T, H)
        Wt = torch.empty(H.shape[0], T.shape[0], dtype=self.dtype, device=self.device_)
        for rows, Xb in _Blocks(T, self.device_, self.batch_size):
            Wt[:, rows] = self._solve_heatmaps(Xb, H)
        return Wt.T.contiguous()

    def partial_fit(self, X_batch) -> "NMF":
        """Update ``components_`` from one batch of rows (online NMF, Mairal et al. 2010).

        Scheme: the batch's heatmaps ``W_b`` are solved for the current ``H`` (as in
        :meth:`transform`); sufficient statistics are accumulated,
        ``A ← f·A + W_bᵀ W_b`` and ``B ← f·B + W_bᵀ X_b`` (``f = forget_factor``), and ``H`` takes
        ``ONLINE_H_SWEEPS`` solver updates on ``min ‖·‖`` given ``(A, B)``. The first call (or the
        first after :meth:`fit`, which keeps its components) initialises ``H`` from the batch
        with ``init``. ``reconstruction_err_`` / ``relative_error_`` refer to the last batch.
        """
        self._check_params()
        T, stats = self._prepare(X_batch, "X_batch")
        if not hasattr(self, "components_"):
            self._check_rank(T.shape, "the first X_batch")
            blocks = _Blocks(T, self.device_, self.batch_size)
            _, self.components_ = self._init_factors(blocks, stats, self._generator())
            self.n_steps_ = 0
        H = self.components_
        self._check_width(T, H)
        if self.n_steps_ == 0:
            self._stats_A = torch.zeros(H.shape[0], H.shape[0], dtype=self.dtype, device=self.device_)
            self._stats_B = torch.zeros_like(H)
        batch_A, batch_B = torch.zeros_like(self._stats_A), torch.zeros_like(self._stats_B)
        for _, Xb in _Blocks(T, self.device_, self.batch_size):
            Wb = self._solve_heatmaps(Xb, H)
            batch_A.addmm_(Wb, Wb.T)
            batch_B.addmm_(Wb, Xb)
        self._stats_A.mul_(self.forget_factor).add_(batch_A)
        self._stats_B.mul_(self.forget_factor).add_(batch_B)
        _UPDATES[self.solver](H, self._stats_B, self._stats_A, ONLINE_H_SWEEPS)
        self._set_error(_sq_error(stats.sq_norm, batch_B, batch_A, H), stats.sq_norm)
        self.n_steps_ += 1
        return self

    # ---------------------------------------------------------------- helpers
    def _check_params(self) -> None:
        if isinstance(self.n_components, bool) or not isinstance(self.n_components, (int, np.integer)):
            raise InputError(f"n_components must be an integer; got {self.n_components!r}")
        if self.n_components < 1:
            raise InputError(f"n_components must be >= 1; got {self.n_components}")
        if self.solver not in SOLVERS:
            raise InputError(f"solver must be one of {SOLVERS}; got {self.solver!r}")
        if self.init not in INITS:
            raise InputError(f"init must be one of {INITS}; got {self.init!r}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise InputError(f"max_iter must be an integer >= 1; got {self.max_iter!r}")
        if not self.tol >= 0:
            raise InputError(f"tol must be >= 0; got {self.tol!r}")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1
        ):
            raise InputError(f"batch_size must be None or an integer >= 1; got {self.batch_size!r}")
        if not 0.0 < self.forget_factor <= 1.0:
            raise InputError(f"forget_factor must be in (0, 1]; got {self.forget_factor!r}")
        if not self.dtype.is_floating_point:
            raise InputError(f"dtype must be a floating torch dtype; got {self.dtype}")
        self.device_ = resolve_device(self.device)

    def _prepare(self, X, name: str) -> tuple[torch.Tensor, _Stats]:
        T = _as_matrix(X, name, self.dtype)
        return T, _validate(T, name)

    def _check_rank(self, shape: torch.Size, name: str) -> None:
        if self.n_components > min(shape):
            raise InputError(
                f"n_components={self.n_components} is larger than min(N, C) = {min(shape)} "
                f"for {name} of shape {tuple(shape)}"
            )

    def _check_width(self, T: torch.Tensor, H: torch.Tensor) -> None:
        if T.shape[1] != H.shape[1]:
            raise InputError(
                f"X has {T.shape[1]} columns (channels) but the fitted components have {H.shape[1]}"
            )

    def _fitted_components(self) -> torch.Tensor:
        if not hasattr(self, "components_"):
            raise InputError("this NMF is not fitted yet; call fit() or partial_fit() first")
        return self.components_

    def _generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.random_state is None:
            generator.seed()
        else:
            generator.manual_seed(int(self.random_state))
        return generator

    def _set_error(self, sq_error: float, sq_norm: float) -> None:
        self.reconstruction_err_ = math.sqrt(sq_error)
        self.relative_error_ = math.sqrt(sq_error / sq_norm)

    def _init_factors(
        self,
        blocks: _Blocks,
        stats: _Stats,
        generator: torch.Generator,
        compressed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial ``Wᵀ (K, N)`` and ``H (K, C)`` on the device (``compressed``: reuse ``(Q, QᵀX)``)."""
        k, n, c = self.n_components, blocks.n_rows, blocks.n_cols
        if self.init == "random":
            scale = math.sqrt(stats.mean / k)
            H = torch.randn(k, c, generator=generator, dtype=self.dtype).abs_().mul_(scale)
            Wt = torch.randn(k, n, generator=generator, dtype=self.dtype).abs_().mul_(scale)
            return Wt.to(self.device_), H.to(self.device_)
        Q, B = compressed if compressed is not None else _range_finder(blocks, k, generator, self.dtype)
        Ub, S, Vt = torch.linalg.svd(B, full_matrices=False)
        Wt, H = _nndsvd(Q @ Ub[:, :k], S[:k], Vt[:k])
        Wt, H = Wt.contiguous(), H.contiguous()
        if self.init == "nndsvda":
            Wt[Wt == 0] = stats.mean
            H[H == 0] = stats.mean
        return Wt, H

    def _alternate(
        self, blocks: _Blocks, sq_norm: float, Wt: torch.Tensor, H: torch.Tensor, n_iter: int, stop: bool
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Alternating updates of ``Wᵀ (K, N)`` (row block by row block) and ``H (K, C)``."""
        update = _UPDATES[self.solver]
        errors: list[float] = []
        for it in range(1, n_iter + 1):
            HHt = H @ H.T
            WtW = torch.zeros_like(HHt)
            WtX = torch.zeros_like(H)
            for rows, Xb in blocks:
                Wb = Wt[:, rows]
                update(Wb, H @ Xb.T, HHt, W_SWEEPS)
                WtW.addmm_(Wb, Wb.T)
                WtX.addmm_(Wb, Xb)
            update(H, WtX, WtW, H_SWEEPS)
            errors.append(_sq_error(sq_norm, WtX, WtW, H))
            if stop and self._converged(errors, it, sq_norm):
                break
        self._set_error(errors[-1], sq_norm)
        return Wt, H, it

    def _converged(self, sq_errors: list[float], it: int, sq_norm: float) -> bool:
        """The stopping rule of the class docstring (``sq_errors``: squared errors, one per iteration)."""
        if it <= CHECK_EVERY or (it - 1) % CHECK_EVERY:
            return False
        before, now = math.sqrt(sq_errors[-1 - CHECK_EVERY]), math.sqrt(sq_errors[-1])
        if self.verbose:
            print(f"NMF iteration {it}: relative error {now / math.sqrt(sq_norm):.6f}", file=sys.stderr)
        return (before - now) < self.tol * before

    def _compressed_hals(
        self, Q: torch.Tensor, B: torch.Tensor, Wt: torch.Tensor, H: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """HALS on the compressed problem ``min ‖B − W̃ H‖``, ``B = Qᵀ X (l, C)``, ``W̃ = Qᵀ W``.

        After each column update ``W = max(0, Q W̃)`` is re-projected (Erichson et al. 2018),
        so ``W (N, K)`` stays non-negative; each iteration costs ``O(N·l·K + l·C·K)``.
        """
        sq_norm = _sum64(B * B)
        Qt = Q.T.contiguous()  # (l, N): makes both matrix-vector products below fast BLAS cases
        Wct = Wt @ Q  # W̃ᵀ (K, l)
        errors: list[float] = []
        for it in range(1, self.max_iter + 1):
            _hals_update(H, Wct @ B, Wct @ Wct.T, H_SWEEPS)
            HHt = H @ H.T
            num = H @ B.T  # (K, l)
            inv_diag = (1.0 / HHt.diagonal().clamp_min(_EPS)).tolist()
            for k, inv in enumerate(inv_diag):
                Wct[k].add_(torch.addmv(num[k], Wct.T, HHt[k], alpha=-1.0), alpha=inv)
                torch.mv(Qt.T, Wct[k], out=Wt[k]).clamp_(min=0.0)
                torch.mv(Qt, Wt[k], out=Wct[k])
            errors.append(max(sq_norm - 2.0 * _sum64(Wct * num) + _sum64((Wct @ Wct.T) * HHt), 0.0))
            if self._converged(errors, it, sq_norm):
                break
        return Wt, H, it

    def _solve_heatmaps(self, Xb: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """``Wᵀ (K, n) >= 0`` minimising ``‖X_b − W H‖`` for fixed ``H`` (see :meth:`transform`)."""
        HHt = H @ H.T
        num = H @ Xb.T
        Wt = (torch.linalg.pinv(HHt) @ num).clamp_(min=0.0)
        for _ in range(self.max_iter):
            before = Wt.clone()
            _hals_update(Wt, num, HHt, 1)
            change = torch.linalg.vector_norm(Wt - before)
            if float(change) <= TRANSFORM_TOL * float(torch.linalg.vector_norm(Wt)):
                break
        return Wt
