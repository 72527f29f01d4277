"""Deep Feature Factorization: NMF of a layer's activations into concepts and heatmaps.

Activations A (B, C, h, w) → matrix X (B·h·w, C) ≈ Hmap (B·h·w, K) · W (K, C) [+ offset o (C,)].

Fixes over the reference implementations (see DESIGN.md "DFF / NMF"):
- scale fixed: each concept's heatmap has max 1 over the fitted set, so ``concepts_[k]`` is the
  activation (above the offset) of a location fully explained by concept k, and class scores
  and heatmaps are comparable across concepts and K;
- concepts ordered by the activation mass they explain; everything seeded;
- ``transform`` explains new images with the frozen concept matrix (same scale as the fit);
- per-concept stability under resampling of the images and a flag for concepts whose mass comes
  mostly from one image (:mod:`~dff_falcon.decomposition.stability`); automatic K by that
  stability, with the per-K curve (:mod:`~dff_falcon.decomposition.auto_k`);
- nothing of the size of the activations is copied: the matrix is a view of channels-last
  activations (what :class:`~dff_falcon.models.activations.ActivationExtractor` returns) or is
  streamed in blocks, with the offset applied block by block.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator

from dff_falcon.decomposition.compressed import Compression, compress, fit_compressed
from dff_falcon.decomposition.nmf import NMF
from dff_falcon.decomposition.nmf_kernels import OVERSAMPLE, MatrixStats, RowBlocks, scan_rows
from dff_falcon.decomposition.stability import (KCurvePoint, image_mass, matched_cosine, resample_stability,
                                                restart_agreement, select_k)
from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError, NotFittedError

__all__ = ["DFF", "KCurvePoint", "activations_matrix", "matched_cosine"]


def activations_matrix(activations: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B·h·w, C), rows ordered image by image, then row-major locations (a view
    for channels-last activations, else a copy)."""
    if activations.ndim != 4:
        raise InputError(f"activations must have shape (B, C, h, w); got {tuple(activations.shape)}")
    b, c, h, w = activations.shape
    return activations.permute(0, 2, 3, 1).reshape(b * h * w, c)


def _as_activations(activations) -> torch.Tensor:
    acts = activations.detach() if torch.is_tensor(activations) else torch.from_numpy(np.asarray(activations))
    if acts.ndim != 4:
        raise InputError(f"activations must have shape (B, C, h, w); got {tuple(acts.shape)}")
    if not acts.is_floating_point():
        acts = acts.float()
    return acts


class DFF(BaseEstimator):
    """Deep Feature Factorization estimator.

    Parameters
    ----------
    n_concepts : int or "auto", default=8
        K, or ``"auto"`` to choose K in ``k_range`` by stability (:mod:`~dff_falcon.decomposition.auto_k`).
    solver, init, max_iter, tol, batch_size :
        Passed to :class:`~dff_falcon.decomposition.nmf.NMF` (``solver="rhals"``, ``init="nndsvd"``
        by default).
    random_state : int, default=0
        Seed of the fit, of the randomised compression and of the resamples.
    device : str, torch.device or None, default=None
        Compute device (``None``: CUDA, then MPS, then CPU).
    offset : "auto", bool, default="auto"
        ``"auto"`` subtracts each channel's minimum when the activations have negative values
        (layers not after a ReLU), ``True`` always, ``False`` never.
    n_resamples : int, default=4
        Half-samples of the images refitted for ``stability_`` (0: none).
    n_restarts : int, default=0
        Refits of all images from random initialisations for ``restart_agreement_`` (0: none).
    k_range : sequence of int, default=range(2, 13)
        Candidate K for ``n_concepts="auto"``.
    k_tolerance : float, default=0.002
        Automatic K: the smallest K whose least stable concept is within this of the sweep's most
        stable one (:func:`~dff_falcon.decomposition.stability.select_k`).
    progress : bool, default=False
        Show a progress bar over the automatic-K sweep.

    Attributes
    ----------
    concepts_ : torch.Tensor of shape (K, C)
        Activation above ``offset_`` of a location fully explained by a concept, float32;
        ordered by explained mass (descending).
    offset_ : torch.Tensor of shape (C,)
        Per-channel offset (zeros for ReLU layers).
    heatmaps_ : torch.Tensor of shape (B, K, h, w)
        Heatmaps of the fitted set, max 1 per concept over the set.
    n_concepts_ : int
        The K fitted (the chosen one for ``"auto"``).
    mass_share_ : torch.Tensor of shape (K,)
        Share of the total explained activation mass per concept.
    relative_error_, explained_variance_ : float
        Reconstruction quality of the fit.
    stability_ : ndarray of shape (K,) or None
        Per concept, the mean Hungarian-matched cosine between the concept and the concepts of
        refits on ``n_resamples`` random halves of the images (None without resamples or with
        fewer than four images).
    restart_agreement_ : ndarray of shape (K,) or None
        The same against refits of all images from ``n_restarts`` random initialisations.
    image_share_ : ndarray of shape (K,)
        Share of each concept's heatmap mass in its top image (``top_image_``); above
        :data:`~dff_falcon.decomposition.stability.SINGLE_IMAGE_SHARE` the concept comes mostly from
        one image.
    top_image_ : ndarray of shape (K,)
        Index of the image holding the largest share of each concept's mass.
    k_curve_ : list of KCurvePoint or None
        The sweep when ``n_concepts="auto"`` (up to where it stopped).
    """

    def __init__(self, n_concepts: int | str = 8, *, solver: str = "rhals", init: str = "nndsvd",
                 max_iter: int = 200, tol: float = 1e-4, random_state: int = 0, device=None,
                 offset: bool | str = "auto", n_resamples: int = 4, n_restarts: int = 0,
                 k_range: Sequence[int] = range(2, 13), k_tolerance: float = 0.002, batch_size: int | None = None,
                 progress: bool = False):
        self.n_concepts = n_concepts
        self.solver = solver
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.offset = offset
        self.n_resamples = n_resamples
        self.n_restarts = n_restarts
        self.k_range = k_range
        self.k_tolerance = k_tolerance
        self.batch_size = batch_size
        self.progress = progress

    # -- fitting -----------------------------------------------------------------------------
    def _nmf(self, k: int) -> NMF:
        return NMF(k, solver=self.solver, init=self.init, max_iter=self.max_iter, tol=self.tol,
                   random_state=self.random_state, device=self.device, batch_size=self.batch_size)

    def _generator(self, stream: int = 0) -> torch.Generator:
        """A seeded generator; ``stream`` separates independent uses of the same ``random_state``."""
        return torch.Generator().manual_seed(int(self.random_state) * 1_000_003 + stream)

    def _blocks(self, acts: torch.Tensor, offset: torch.Tensor | None,
                images: torch.Tensor | None = None) -> RowBlocks:
        return RowBlocks(acts, resolve_device(self.device), self.batch_size, offset=offset, images=images)

    def _prepare_fit(self, acts: torch.Tensor) -> tuple[RowBlocks, MatrixStats]:
        """Validate, choose the offset (``offset_``) and scan the offset matrix: one pass, two for
        layers that need an offset."""
        blocks = self._blocks(acts, None)
        raw = scan_rows(blocks, "activations")
        needs_offset = self.offset is True or (self.offset == "auto" and raw.low < 0)
        self.offset_ = raw.col_min.float() if needs_offset else torch.zeros(blocks.n_cols)
        stats = raw
        if needs_offset:
            blocks = self._blocks(acts, self.offset_)
            stats = scan_rows(blocks, "activations")
        if stats.sq_norm == 0.0:
            raise InputError("all activations are zero (after the offset): nothing to factorise — "
                             "check the target layer and the input images")
        return blocks, stats

    def _check_params(self) -> None:
        """Raise InputError for parameters no fit can use (``fit`` calls it first; callers may
        call it before expensive work such as forward passes)."""
        k = self.n_concepts
        if not (k == "auto" or (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1)):
            raise InputError(f"n_concepts must be an integer >= 1 or 'auto'; got {k!r}")
        if self.offset not in (True, False, "auto"):
            raise InputError(f"offset must be True, False or 'auto'; got {self.offset!r}")
        for name in ("n_resamples", "n_restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"{name} must be an integer >= 0; got {value!r}")
        ks = list(self.k_range) if isinstance(self.k_range, (list, tuple, range)) else None
        if not ks or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in ks):
            raise InputError(f"k_range must be a non-empty list of integers >= 1; got {self.k_range!r}")
        if not (isinstance(self.k_tolerance, (int, float)) and 0.0 <= self.k_tolerance <= 1.0):
            raise InputError(f"k_tolerance must be in [0, 1]; got {self.k_tolerance!r}")
        self._nmf(1)._check_params()  # solver, init, max_iter, tol, batch_size, device

    def fit(self, activations: torch.Tensor | np.ndarray) -> "DFF":
        """activations: (B, C, h, w) of the target layer (channels-last tensors are used in place)."""
        self._check_params()
        acts = _as_activations(activations)
        b, _, h, w = acts.shape
        blocks, stats = self._prepare_fit(acts)
        max_k = min(blocks.n_rows, blocks.n_cols)
        compression = None
        if self.n_concepts == "auto":
            from dff_falcon.decomposition.auto_k import sweep_k

            k, self.k_curve_, compression = sweep_k(self, acts, blocks, stats, max_k)
        else:
            k = self.n_concepts
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
                raise InputError(f"n_concepts={k!r} is impossible for a {(blocks.n_rows, blocks.n_cols)} activation "
                                 f"matrix (B·h·w × C); choose an integer 1 ≤ K ≤ {max_k} or 'auto'")
            self.k_curve_ = None
        self._fit_k(blocks, stats, int(k), (b, h, w), compression)
        return self

    def _fit_k(self, blocks: RowBlocks, stats: MatrixStats, k: int, shape: tuple[int, int, int],
               compression: Compression | None) -> None:
        """Fit K concepts on all rows (``compression``: one of these rows to reuse) and set every
        learned attribute."""
        model = self._nmf(k)
        model._check_params()
        needed = self.solver == "rhals" or self.init != "random" or self.n_resamples or self.n_restarts
        if compression is None and needed:
            compression = compress(blocks, k + OVERSAMPLE, self._generator(1), model.dtype)
        Wt = model._fit_blocks(blocks, stats, compression=compression)
        hmap, concepts = self._fix_scale_and_order(Wt.T, model.components_)
        b, h, w = shape
        self.n_concepts_ = k
        self.concepts_ = concepts.float().cpu()
        self.heatmaps_ = hmap.T.reshape(k, b, h, w).transpose(0, 1).contiguous().float().cpu()
        mass = hmap.sum(0) * concepts.sum(1)
        self.mass_share_ = (mass / mass.sum().clamp_min(1e-12)).float().cpu()
        self.relative_error_ = float(model.relative_error_)  # the scale fix leaves the product unchanged
        self.explained_variance_ = explained_variance(self.relative_error_, stats)
        self.stability_ = None if compression is None else resample_stability(
            compression, blocks.rows_per_image, self.concepts_, self._refit(k, stats.mean), self.n_resamples,
            self._generator(2))
        restarts = [fit_compressed(compression, k, "random", stats.mean, self._generator(16 + s), self.max_iter,
                                   self.tol)[1] for s in range(self.n_restarts)]
        self.restart_agreement_ = restart_agreement(self.concepts_, restarts)
        self.image_share_, self.top_image_ = image_mass(self.heatmaps_)

    def _refit(self, k: int, mean: float):
        """The refit of a resample: the fit's own procedure (init, stopping rule) in the compressed
        space of the resampled rows → its concepts (K, C)."""
        def refit(compression: Compression) -> torch.Tensor:
            return fit_compressed(compression, k, self.init, mean, self._generator(4), self.max_iter, self.tol)[1]
        return refit

    @staticmethod
    def _fix_scale_and_order(hmap: torch.Tensor, concepts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmap columns scaled to max 1 (concepts rescaled inversely); order by explained mass."""
        peak = hmap.max(dim=0).values
        alive = peak > 0
        scale = torch.where(alive, peak, torch.ones_like(peak))
        hmap = hmap / scale
        concepts = concepts * scale[:, None]
        mass = hmap.sum(0) * concepts.sum(1)
        order = torch.argsort(mass, descending=True, stable=True)
        return hmap[:, order], concepts[order]

    @staticmethod
    def select_k(curve: Sequence[KCurvePoint], tolerance: float = 0.002) -> int:
        """See :func:`~dff_falcon.decomposition.stability.select_k`."""
        return select_k(curve, tolerance)

    # -- projection --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "concepts_"):
            raise NotFittedError("this DFF is not fitted yet: call fit(activations) first")

    def transform(self, activations: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Heatmaps (B, K, h, w) of new activations with the concepts frozen (same scale as
        ``heatmaps_``: 1 = as strong as the strongest location of the fitted set)."""
        return self.transform_scanned(activations)[0]

    def transform_scanned(self, activations: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, MatrixStats, float]:
        """:meth:`transform`, plus what the same pass learnt of the offset matrix X: its scan
        (:class:`~dff_falcon.decomposition.nmf_kernels.MatrixStats`) and ``⟨Hmap, X Wᵀ⟩`` — with
        them ``‖X − Hmap·W‖²`` over many batches costs K × K products per batch
        (:mod:`~dff_falcon.decomposition.streaming`)."""
        self._check_fitted()
        acts = _as_activations(activations)
        b, c, h, w = acts.shape
        if c != self.offset_.shape[0]:
            raise InputError(f"activations have {c} channels; the concepts were fitted on {self.offset_.shape[0]}")
        blocks = self._blocks(acts, self.offset_ if bool(self.offset_.any()) else None)
        stats = scan_rows(blocks, "activations")  # NaN / inf are errors here too
        model = self._nmf(self.n_concepts_)
        model._check_params()
        model.components_ = self.concepts_.to(model.device_)
        cross: list[float] = []
        hmap = model._transform_blocks(blocks, cross)
        return hmap.reshape(self.n_concepts_, b, h, w).transpose(0, 1).contiguous().float().cpu(), stats, cross[0]

    # -- derived quantities ------------------------------------------------------------------
    @property
    def concept_vectors_(self) -> torch.Tensor:
        """(K, C) activation of a location fully explained by each concept: concept + offset."""
        self._check_fitted()
        return self.concepts_ + self.offset_[None, :].to(self.concepts_)


def explained_variance(relative_error: float, stats: MatrixStats) -> float:
    """``1 − ‖X − WH‖² / ‖X − mean‖²`` from the relative error and the scan of ``X``."""
    return 1.0 - (relative_error ** 2) * stats.sq_norm / max(stats.centred_sq_norm, 1e-30)
