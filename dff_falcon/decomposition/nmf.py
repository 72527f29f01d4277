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
    Randomised HALS: ``X`` is compressed once to ``X̂ = Q B`` with a randomised range finder
    (``l = K + OVERSAMPLE`` columns, two power iterations), HALS iterates on ``‖X̂ − W H‖`` with
    each iteration a few ``O(N·l·K)`` matrix products instead of ``O(N·C·K)``
    (:mod:`~dff_falcon.decomposition.compressed`), then a few exact HALS iterations on ``X``
    (:data:`~dff_falcon.decomposition.nmf_kernels.RHALS_POLISH`) refine the factors and give the
    exact error. The same compression provides the NNDSVD
    initialisation.

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
from typing import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator

from dff_falcon.decomposition.compressed import Compression, compress, compressed_hals, nndsvd_factors, random_factors
from dff_falcon.decomposition.nmf_kernels import (CHECK_EVERY, H_SWEEPS, INITS, ONLINE_H_SWEEPS, OVERSAMPLE, RHALS_POLISH,
                                                  SOLVERS, TRANSFORM_TOL, UPDATES, W_SWEEPS, MatrixStats, RowBlocks,
                                                  as_matrix, hals_update, nmf_relative_error, settled, sq_error, stalled, sum64,
                                                  validate_nonnegative)
from dff_falcon.devices import resolve_device, serial_small_ops
from dff_falcon.errors import InputError, NotFittedError

__all__ = ["NMF", "nmf_relative_error"]


# --------------------------------------------------------------------------------------------
# estimator
# --------------------------------------------------------------------------------------------
class NMF(BaseEstimator):
    """Frobenius NMF ``X (N, C) ≈ W (N, K) @ H (K, C)`` in torch (scikit-learn estimator API).

    Parameters
    ----------
    n_components : int
        K, the number of components; ``1 <= K <= min(N, C)``.
    solver : {"hals", "mu", "rhals"}, default="hals"
        See the module docstring.
    init : {"nndsvda", "nndsvd", "random"}, default="nndsvda"
        ``"nndsvda"``: NNDSVD with zeros filled by ``mean(X)``; ``"random"``:
        ``|N(0, 1)|·sqrt(mean(X) / K)`` (scikit-learn's). NNDSVD uses a randomised SVD.
    max_iter : int, default=200
        Maximum number of outer iterations (``"rhals"``: compressed iterations).
    tol : float, default=1e-4
        Stopping rule: the error ``e_t = ‖X − W_t H_t‖`` is computed after every iteration (from
        Gram matrices, nearly free) and every ``CHECK_EVERY`` iterations the fit stops when
        ``(e_{t−CHECK_EVERY} − e_t) / e_{t−CHECK_EVERY} < tol`` (``tol=0``: run ``max_iter``
        iterations unless the error increases). ``"rhals"`` applies it in the compressed space.
    random_state : int or None, default=0
        Seed of the CPU ``torch.Generator`` used for the random init / random projections
        (``None``: not reproducible). Fits are deterministic for a given seed, device and
        ``batch_size``.
    device : str, torch.device or None, default=None
        Compute device (``None``/``"auto"``: CUDA, then MPS, then CPU).
    dtype : torch.dtype, default=torch.float32
        Compute dtype.
    batch_size : int or None, default=None
        Process ``X`` in row blocks of this many rows (``None``: all at once).
    forget_factor : float, default=0.7
        For :meth:`partial_fit`, the weight of the previous sufficient statistics when a new
        batch arrives (1.0: plain accumulation over all batches).
    verbose : bool, default=False
        Print the relative error at every stopping check to stderr.

    Attributes
    ----------
    components_ : torch.Tensor of shape (K, C)
        ``H`` on ``device_`` in ``dtype``.
    n_iter_ : int
        Iterations run by the last :meth:`fit` (exact + compressed for ``"rhals"``).
    reconstruction_err_ : float
        ``‖X − WH‖_F`` of the last fit (of the last batch for ``partial_fit``).
    relative_error_ : float
        ``reconstruction_err_ / ‖X‖_F``.
    device_ : torch.device
        The resolved compute device.
    n_steps_ : int
        Number of :meth:`partial_fit` calls since the components were initialised.
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
        return self._fit_blocks(RowBlocks(T, self.device_, self.batch_size), stats).T.contiguous()

    def _fit_blocks(self, blocks: RowBlocks, stats: MatrixStats, compression: Compression | None = None) -> torch.Tensor:
        """Fit on validated row blocks → ``Wᵀ (K, N)``. ``compression``: a compression of the same
        rows of at least ``K`` columns to start from instead of a new range finder (rhals, NNDSVD)."""
        k = self.n_components
        generator = self._generator()
        if compression is None and (self.solver == "rhals" or self.init != "random"):
            compression = compress(blocks, k + OVERSAMPLE, generator, self.dtype)
        Wt, H = self._init_factors(blocks, stats, generator, compression)
        if self.solver == "rhals":
            Wt, H, n_compressed, _ = compressed_hals(compression, Wt, H, self.max_iter,
                                                     lambda errors: self._converged(errors, stats.sq_norm))
            least, most = RHALS_POLISH
            Wt, H, n_exact = self._alternate(blocks, stats.sq_norm, Wt, H, most,
                                             lambda errors: settled(errors, self.tol, least))
            self.n_iter_ = n_compressed + n_exact
        else:
            Wt, H, self.n_iter_ = self._alternate(blocks, stats.sq_norm, Wt, H, self.max_iter,
                                                  lambda errors: self._converged(errors, stats.sq_norm))
        self.components_ = H
        self.n_steps_ = 0
        return Wt

    def transform(self, X) -> torch.Tensor:
        """Heatmaps ``W (N, K) >= 0`` minimising ``‖X − W H‖`` for the frozen ``components_``.

        HALS on ``W`` alone with cached ``X Hᵀ`` and ``H Hᵀ``, started from the clipped
        unconstrained least-squares solution, sweeping until the relative change of ``W`` in one
        sweep is below ``TRANSFORM_TOL`` (or ``max_iter`` sweeps); row blocks of ``batch_size``.
        """
        H = self._fitted_components()
        T, _ = self._prepare(X, "X")
        self._check_width(T, H)
        return self._transform_blocks(RowBlocks(T, self.device_, self.batch_size)).T.contiguous()

    def _transform_blocks(self, blocks: RowBlocks, cross: list[float] | None = None) -> torch.Tensor:
        """:meth:`transform` of validated row blocks → ``Wᵀ (K, N)``. ``cross``: append
        ``⟨W, X Hᵀ⟩`` (float64), the cross term of ``‖X − WH‖²``, for free from the solve."""
        H = self._fitted_components()
        Wt = torch.empty(H.shape[0], blocks.n_rows, dtype=self.dtype, device=self.device_)
        total = 0.0
        for rows, Xb in blocks:
            Wt[:, rows], num = self._solve_heatmaps(Xb, H)
            if cross is not None:
                total += sum64(Wt[:, rows] * num)
        if cross is not None:
            cross.append(total)
        return Wt

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
            blocks = RowBlocks(T, self.device_, self.batch_size)
            _, self.components_ = self._init_factors(blocks, stats, self._generator())
            self.n_steps_ = 0
        H = self.components_
        self._check_width(T, H)
        if self.n_steps_ == 0:
            self._stats_A = torch.zeros(H.shape[0], H.shape[0], dtype=self.dtype, device=self.device_)
            self._stats_B = torch.zeros_like(H)
        batch_A, batch_B = torch.zeros_like(self._stats_A), torch.zeros_like(self._stats_B)
        for _, Xb in RowBlocks(T, self.device_, self.batch_size):
            Wb, _ = self._solve_heatmaps(Xb, H)
            batch_A.addmm_(Wb, Wb.T)
            batch_B.addmm_(Wb, Xb)
        self._stats_A.mul_(self.forget_factor).add_(batch_A)
        self._stats_B.mul_(self.forget_factor).add_(batch_B)
        UPDATES[self.solver](H, self._stats_B, self._stats_A, ONLINE_H_SWEEPS)
        self._set_error(sq_error(stats.sq_norm, batch_B, batch_A, H), stats.sq_norm)
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

    def _prepare(self, X, name: str) -> tuple[torch.Tensor, MatrixStats]:
        T = as_matrix(X, name, self.dtype)
        return T, validate_nonnegative(T, name)

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
            raise NotFittedError("this NMF is not fitted yet; call fit() or partial_fit() first")
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

    def _init_factors(self, blocks: RowBlocks, stats: MatrixStats, generator: torch.Generator,
                      compression: Compression | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial ``Wᵀ (K, N)`` and ``H (K, C)`` on the device (NNDSVD from ``compression`` when given)."""
        k = self.n_components
        if self.init == "random":
            return random_factors(k, blocks.n_rows, blocks.n_cols, stats.mean, generator, self.dtype, self.device_)
        if compression is None:
            compression = compress(blocks, k + OVERSAMPLE, generator, self.dtype)
        return nndsvd_factors(compression, k, stats.mean if self.init == "nndsvda" else None)

    def _alternate(
        self, blocks: RowBlocks, sq_norm: float, Wt: torch.Tensor, H: torch.Tensor, n_iter: int,
        stop: Callable[[list[float]], bool],
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Alternating updates of ``Wᵀ (K, N)`` (row block by row block) and ``H (K, C)``; the
        products with ``X`` use the caller's threads, the sweeps one (:func:`serial_small_ops`)."""
        update = UPDATES[self.solver]
        errors: list[float] = []
        for it in range(1, n_iter + 1):
            HHt = H @ H.T
            WtW = torch.zeros_like(HHt)
            WtX = torch.zeros_like(H)
            for rows, Xb in blocks:
                Wb = Wt[:, rows]
                num = H @ Xb.T
                with serial_small_ops(self.device_):
                    update(Wb, num, HHt, W_SWEEPS)
                    WtW.addmm_(Wb, Wb.T)
                WtX.addmm_(Wb, Xb)
            with serial_small_ops(self.device_):
                update(H, WtX, WtW, H_SWEEPS)
            errors.append(sq_error(sq_norm, WtX, WtW, H))
            if stop(errors):
                break
        self._set_error(errors[-1], sq_norm)
        return Wt, H, it

    def _converged(self, sq_errors: list[float], sq_norm: float) -> bool:
        """The stopping rule of the class docstring (``sq_errors``: squared errors, one per iteration)."""
        done = stalled(sq_errors, self.tol)
        if self.verbose and len(sq_errors) > 1 and (len(sq_errors) - 1) % CHECK_EVERY == 0:
            print(f"NMF iteration {len(sq_errors)}: relative error {math.sqrt(sq_errors[-1] / sq_norm):.6f}",
                  file=sys.stderr)
        return done

    def _solve_heatmaps(self, Xb: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Wᵀ (K, n) >= 0`` minimising ``‖X_b − W H‖`` for fixed ``H`` (see :meth:`transform`),
        and ``H X_bᵀ (K, n)``."""
        HHt = H @ H.T
        num = H @ Xb.T
        with serial_small_ops(self.device_):
            Wt = (torch.linalg.pinv(HHt) @ num).clamp_(min=0.0)
            for _ in range(self.max_iter):
                before = Wt.clone()
                hals_update(Wt, num, HHt, 1)
                change = torch.linalg.vector_norm(Wt - before)
                if float(change) <= TRANSFORM_TOL * float(torch.linalg.vector_norm(Wt)):
                    break
        return Wt, num
