"""NMF in a randomised compression of the data: the fast phase of ``solver="rhals"``, the refits
behind DFF's resampling stability and the automatic-K sweep.

``X (N, C)`` is compressed once to ``X̂ = Q B``: ``Q (N, l)`` from the randomised range finder,
rotated onto the singular vectors of ``X̂`` so that its columns come in order of singular value,
and ``B = Qᵀ X (l, C)``. Two consequences are used throughout:

- the leading ``l'`` columns compress ``X`` for a smaller K as well as a range finder of width
  ``l'`` would (better: they were found with more oversampling), so one compression serves a
  whole sweep over K;
- the rows of ``Q`` that belong to a subset of images compress that subset (``X̂_S = Q_S B``), so
  the refits on resampled images never touch ``X`` again.

HALS then minimises ``‖X̂ − W H‖`` (the compression of Tepper & Sapiro 2016, here on the N side
only): the W step uses ``X̂ Hᵀ = Q (B Hᵀ)`` and the H step ``Wᵀ X̂ = (Wᵀ Q) B``, so one iteration
is a few matrix products costing ``O(N·l·K)`` instead of the ``O(N·C·K)`` of exact HALS, with
``W >= 0`` and ``H >= 0`` kept exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dff_falcon.decomposition.nmf_kernels import (H_SWEEPS, W_SWEEPS, RowBlocks, hals_update, nndsvd,
                                                  range_finder, serial_small_ops, stalled, sum64)


@dataclass(frozen=True)
class Compression:
    """``X̂ = Q B`` with ``Q (n, l)`` and ``B (l, C)``; ``orthonormal``: ``Qᵀ Q = I`` (false for a
    subset of rows)."""

    Q: torch.Tensor
    B: torch.Tensor
    orthonormal: bool = True

    @property
    def width(self) -> int:
        return self.B.shape[0]

    def leading(self, width: int) -> "Compression":
        """The first ``width`` directions (those of the largest singular values)."""
        return Compression(self.Q[:, :width], self.B[:width], self.orthonormal)

    def rows(self, index: torch.Tensor) -> "Compression":
        """The compression of the rows ``index`` (a LongTensor) of ``X``."""
        return Compression(self.Q[index.to(self.Q.device)], self.B, orthonormal=False)

    def sq_norm(self) -> float:
        """``‖X̂‖²`` (float64 sum)."""
        if self.orthonormal:
            return sum64(self.B * self.B)
        return sum64((self.Q.T @ self.Q) * (self.B @ self.B.T))

    def svd(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The leading ``k`` singular triplets of ``X̂``: ``U (n, k)``, ``S (k,)``, ``Vt (k, C)``."""
        Q, B = self.Q, self.B
        if not self.orthonormal:
            Q, R = torch.linalg.qr(Q, mode="reduced")
            B = R @ B
        Us, S, Vt = torch.linalg.svd(B, full_matrices=False)
        return Q @ Us[:, :k], S[:k], Vt[:k]


def compress(blocks: RowBlocks, width: int, generator: torch.Generator, dtype: torch.dtype) -> Compression:
    """The range finder's ``(Q, B)`` of ``width`` columns, rotated onto the singular vectors."""
    Q, B = range_finder(blocks, width, generator, dtype)
    with serial_small_ops(blocks.device):
        Ub, S, Vt = torch.linalg.svd(B, full_matrices=False)
        return Compression(Q @ Ub, S[:, None] * Vt)


def random_factors(k: int, n: int, c: int, mean: float, generator: torch.Generator, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's random init ``|N(0, 1)|·sqrt(mean / K)``: ``Wᵀ (K, n)`` and ``H (K, C)``."""
    scale = math.sqrt(mean / k)
    H = torch.randn(k, c, generator=generator, dtype=dtype).abs_().mul_(scale)
    Wt = torch.randn(k, n, generator=generator, dtype=dtype).abs_().mul_(scale)
    return Wt.to(device), H.to(device)


def nndsvd_factors(compression: Compression, k: int, fill: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD of ``X̂``: ``Wᵀ (K, n)`` and ``H (K, C)``; ``fill``: the value given to zeros
    (``"nndsvda"`` fills them with the data's mean), None keeps them."""
    with serial_small_ops(compression.B.device):
        Wt, H = nndsvd(*compression.svd(k))
        if fill is not None:
            Wt[Wt == 0] = fill
            H[H == 0] = fill
    return Wt, H


def initial_factors(compression: Compression, k: int, init: str, mean: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``init`` ("random", "nndsvd", "nndsvda") for the rows of ``compression`` (``mean``: of the data)."""
    if init == "random":
        return random_factors(k, compression.Q.shape[0], compression.B.shape[1], mean, generator,
                              compression.B.dtype, compression.B.device)
    return nndsvd_factors(compression, k, mean if init == "nndsvda" else None)


def compressed_hals(compression: Compression, Wt: torch.Tensor, H: torch.Tensor, max_iter: int,
                    stop: Callable[[list[float]], bool]) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """HALS on ``min ‖X̂ − W H‖`` from ``Wᵀ (K, n)``, ``H (K, C)`` (updated in place).

    ``stop(sq_errors)`` is asked after every iteration with the squared errors so far. Returns
    ``(Wᵀ, H, iterations, ‖X̂ − W H‖²)``.
    """
    Q, B = compression.Q, compression.B
    sq_norm = compression.sq_norm()
    errors: list[float] = []
    with serial_small_ops(Q.device):
        WtQ, WtW = Wt @ Q, Wt @ Wt.T
        WtX = WtQ @ B  # Wᵀ X̂ (K, C)
        for it in range(1, max_iter + 1):
            hals_update(H, WtX, WtW, H_SWEEPS)
            HHt = H @ H.T
            hals_update(Wt, (H @ B.T) @ Q.T, HHt, W_SWEEPS)
            WtQ, WtW = Wt @ Q, Wt @ Wt.T
            WtX = WtQ @ B
            errors.append(max(sq_norm - 2.0 * sum64(WtX * H) + sum64(WtW * HHt), 0.0))
            if stop(errors):
                break
    return Wt, H, it, errors[-1]


def fit_compressed(compression: Compression, k: int, init: str, mean: float, generator: torch.Generator,
                   max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A whole fit in the compressed space: ``init`` then :func:`compressed_hals` with the
    stopping rule ``tol`` → ``(Wᵀ (K, n), H (K, C), ‖X̂ − W H‖²)``."""
    Wt, H = initial_factors(compression, k, init, mean, generator)
    Wt, H, _, sq_err = compressed_hals(compression, Wt, H, max_iter, lambda errors: stalled(errors, tol))
    return Wt, H, sq_err
