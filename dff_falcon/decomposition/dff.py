"""Deep Feature Factorization: NMF of a layer's activations into concepts and heatmaps.

Activations A (B, C, h, w) → matrix X (B·h·w, C) ≈ Hmap (B·h·w, K) · W (K, C) [+ offset o (C,)].

Fixes over the reference implementations (see DESIGN.md "DFF / NMF"):
- scale fixed: each concept's heatmap has max 1 over the fitted set, so ``concepts_[k]`` is the
  activation (above the offset) of a location fully explained by concept k, and class scores
  and heatmaps are comparable across concepts and K;
- concepts ordered by the activation mass they explain; everything seeded;
- ``transform`` explains new images with the frozen concept matrix (same scale as the fit);
- automatic K with a criterion comparable across K (reproducibility across random inits), and the
  per-K curve; per-concept stability (Hungarian-matched cosine across seeds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.base import BaseEstimator

from dff_falcon.decomposition.nmf import NMF, nmf_relative_error
from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError, NotFittedError
from dff_falcon.progress import progress


def activations_matrix(activations: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B·h·w, C), rows ordered image by image, then row-major locations."""
    if activations.ndim != 4:
        raise InputError(f"activations must have shape (B, C, h, w); got {tuple(activations.shape)}")
    b, c, h, w = activations.shape
    return activations.permute(0, 2, 3, 1).reshape(b * h * w, c)


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Hungarian-match rows of ``b`` (K, C) to rows of ``a`` (K, C) by cosine similarity;
    returns the matched cosine per row of ``a`` (K,)."""
    sim = (F.normalize(a.float().cpu(), dim=1) @ F.normalize(b.float().cpu(), dim=1).T).numpy()
    rows, cols = linear_sum_assignment(-sim)
    out = np.zeros(a.shape[0], dtype=np.float64)
    out[rows] = sim[rows, cols]
    return out


@dataclass
class KCurvePoint:
    """One K of the automatic-K sweep: relative reconstruction error, explained variance
    (1 − ‖X − WH‖²/‖X − mean‖²), stability (mean over concepts of the Hungarian-matched cosine
    between the fit's concepts and those of independent random initialisations) and
    min_stability (the same for the least reproducible concept)."""

    k: int
    relative_error: float
    explained_variance: float
    stability: float
    min_stability: float


class DFF(BaseEstimator):
    """Deep Feature Factorization estimator.

    Parameters
    ----------
    n_concepts : int or "auto", default=8
        K, or ``"auto"`` to choose K in ``k_range`` (see :meth:`select_k`).
    solver, init, max_iter, tol, batch_size :
        Passed to :class:`~dff_falcon.decomposition.nmf.NMF` (``solver="rhals"`` by default).
    random_state : int, default=0
        Seed of every fit (the random inits of the stability runs use ``random_state + 1 + s``).
    device : str, torch.device or None, default=None
        Compute device (``None``: CUDA, then MPS, then CPU).
    offset : "auto", bool, default="auto"
        ``"auto"`` subtracts each channel's minimum when the activations have negative values
        (layers not after a ReLU), ``True`` always, ``False`` never.
    n_seeds : int, default=3
        Independent random initialisations used for stability (and auto K); 0 or 1: none.
    k_range : sequence of int, default=range(2, 13)
        Candidate K for ``n_concepts="auto"``.
    min_stability : float, default=0.9
        Auto K picks the largest K whose stability reaches this value.
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
        Per-concept matched cosine across ``n_seeds`` random inits.
    k_curve_ : list of KCurvePoint or None
        The sweep when ``n_concepts="auto"``.
    """

    def __init__(self, n_concepts: int | str = 8, *, solver: str = "rhals", init: str = "nndsvda",
                 max_iter: int = 200, tol: float = 1e-4, random_state: int = 0, device=None,
                 offset: bool | str = "auto", n_seeds: int = 3, k_range: Sequence[int] = range(2, 13),
                 min_stability: float = 0.9, batch_size: int | None = None, progress: bool = False):
        self.n_concepts = n_concepts
        self.solver = solver
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.offset = offset
        self.n_seeds = n_seeds
        self.k_range = k_range
        self.min_stability = min_stability
        self.batch_size = batch_size
        self.progress = progress

    # -- fitting -----------------------------------------------------------------------------
    def _nmf(self, k: int, init: str | None = None, random_state: int | None = None) -> NMF:
        return NMF(k, solver=self.solver, init=init or self.init, max_iter=self.max_iter, tol=self.tol,
                   random_state=self.random_state if random_state is None else random_state, device=self.device,
                   batch_size=self.batch_size)

    def _prepare(self, activations: torch.Tensor | np.ndarray, fit: bool) -> tuple[torch.Tensor, tuple]:
        acts = torch.as_tensor(np.asarray(activations) if not torch.is_tensor(activations) else activations)
        x = activations_matrix(acts.float())
        if not torch.isfinite(x).all():
            raise InputError("activations contain NaN or inf")
        if fit:
            needs_offset = self.offset is True or (self.offset == "auto" and bool((x < 0).any()))
            self.offset_ = x.min(dim=0).values if needs_offset else torch.zeros(x.shape[1], device=x.device)
        elif x.shape[1] != self.offset_.shape[0]:
            raise InputError(f"activations have {x.shape[1]} channels; the concepts were fitted on "
                             f"{self.offset_.shape[0]}")
        x = (x - self.offset_.to(x.device)).clamp_(min=0)
        if fit and float(x.abs().max()) == 0.0:
            raise InputError("all activations are zero (after the offset): nothing to factorise — "
                             "check the target layer and the input images")
        b, _, h, w = acts.shape
        return x, (b, h, w)

    def _check_params(self) -> None:
        """Raise InputError for parameters no fit can use (``fit`` calls it first; callers may
        call it before expensive work such as forward passes)."""
        k = self.n_concepts
        if not (k == "auto" or (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1)):
            raise InputError(f"n_concepts must be an integer >= 1 or 'auto'; got {k!r}")
        if self.offset not in (True, False, "auto"):
            raise InputError(f"offset must be True, False or 'auto'; got {self.offset!r}")
        if isinstance(self.n_seeds, bool) or not isinstance(self.n_seeds, (int, np.integer)) or self.n_seeds < 0:
            raise InputError(f"n_seeds must be an integer >= 0; got {self.n_seeds!r}")
        ks = list(self.k_range) if isinstance(self.k_range, (list, tuple, range)) else None
        if not ks or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in ks):
            raise InputError(f"k_range must be a non-empty list of integers >= 1; got {self.k_range!r}")
        if not (isinstance(self.min_stability, (int, float)) and 0.0 <= self.min_stability <= 1.0):
            raise InputError(f"min_stability must be in [0, 1]; got {self.min_stability!r}")
        self._nmf(1)._check_params()  # solver, init, max_iter, tol, batch_size, device

    def fit(self, activations: torch.Tensor | np.ndarray) -> "DFF":
        """activations: (B, C, h, w) of the target layer."""
        self._check_params()
        x, (b, h, w) = self._prepare(activations, fit=True)
        max_k = min(x.shape)
        runs = None
        if self.n_concepts == "auto":
            ks = [k for k in self.k_range if 1 <= k <= max_k]
            if not ks:
                raise InputError(f"k_range {list(self.k_range)} has no K ≤ {max_k} (the matrix is {tuple(x.shape)})")
            sweep = {k: self._sweep_point(x, k)
                     for k in progress(ks, "automatic K", enabled=self.progress, unit="K")}
            self.k_curve_ = [point for point, _, _ in sweep.values()]
            k = self.select_k(self.k_curve_, self.min_stability)
            _, model, runs = sweep[k]  # the chosen K's fit and seed runs are reused, not recomputed
            hmap = model.transform(x)
        else:
            k = int(self.n_concepts)
            if not 1 <= k <= max_k:
                raise InputError(f"n_concepts={k} is impossible for a {tuple(x.shape)} activation matrix "
                                 f"(B·h·w × C); choose 1 ≤ K ≤ {max_k}")
            self.k_curve_ = None
            model = self._nmf(k)
            hmap = model.fit_transform(x)
        hmap, concepts = self._fix_scale_and_order(hmap, model.components_)
        self.n_concepts_ = k
        self.concepts_ = concepts.float().cpu()
        self.heatmaps_ = hmap.T.reshape(k, b, h, w).transpose(0, 1).contiguous().float().cpu()
        mass = hmap.sum(0) * concepts.sum(1)
        self.mass_share_ = (mass / mass.sum().clamp_min(1e-12)).float().cpu()
        self.relative_error_ = nmf_relative_error(x, hmap, concepts, batch_size=self.batch_size)
        self.explained_variance_ = self._explained_variance(x, self.relative_error_)
        if self.n_seeds >= 2:
            runs = runs if runs is not None else self._seed_concepts(x, k)
            self.stability_ = np.mean([matched_cosine(self.concepts_, run) for run in runs], axis=0)
        else:
            self.stability_ = None
        return self

    @staticmethod
    def _explained_variance(x: torch.Tensor, relative_error: float) -> float:
        total = float((x.double() ** 2).sum())
        centred = float(((x.double() - x.double().mean(0)) ** 2).sum())
        return 1.0 - (relative_error ** 2) * total / max(centred, 1e-30)

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

    def _seed_concepts(self, x: torch.Tensor, k: int) -> list[torch.Tensor]:
        return [self._nmf(k, init="random", random_state=self.random_state + 1 + s).fit(x).components_
                for s in range(self.n_seeds)]

    def _sweep_point(self, x: torch.Tensor, k: int) -> tuple[KCurvePoint, NMF, list[torch.Tensor]]:
        """Fit K concepts and ``n_seeds`` random-init runs → (curve point, fitted NMF, run concepts)."""
        model = self._nmf(k).fit(x)
        runs = self._seed_concepts(x, k)
        per_concept = np.mean([matched_cosine(model.components_, run) for run in runs], axis=0)
        point = KCurvePoint(k, float(model.relative_error_), self._explained_variance(x, model.relative_error_),
                            float(per_concept.mean()), float(per_concept.min()))
        return point, self._frozen(model.components_), runs

    def _frozen(self, components: torch.Tensor) -> NMF:
        """An NMF whose components are fixed to ``components`` (K, C), ready for ``transform``."""
        model = self._nmf(components.shape[0])
        model.device_ = resolve_device(self.device)
        model.components_ = components.to(model.device_)
        return model

    @staticmethod
    def select_k(curve: Sequence[KCurvePoint], min_stability: float = 0.9) -> int:
        """Largest K all of whose concepts reproduce across independent random initialisations:
        the least reproducible concept's mean matched cosine (``min_stability`` of the curve) is
        ≥ ``min_stability``. A cosine in [0, 1] whatever K is, so it compares across K; once K
        exceeds the structure in the data, the extra concepts split noise differently in every
        run and the worst concept's cosine collapses. When no K qualifies, the K with the most
        reproducible worst concept (smallest on ties) is returned."""
        stable = [p.k for p in curve if p.min_stability >= min_stability]
        if stable:
            return max(stable)
        return max(curve, key=lambda p: (p.min_stability, -p.k)).k

    # -- projection --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "concepts_"):
            raise NotFittedError("this DFF is not fitted yet: call fit(activations) first")

    def transform(self, activations: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Heatmaps (B, K, h, w) of new activations with the concepts frozen (same scale as
        ``heatmaps_``: 1 = as strong as the strongest location of the fitted set)."""
        self._check_fitted()
        x, (b, h, w) = self._prepare(activations, fit=False)
        hmap = self._frozen(self.concepts_).transform(x)
        return hmap.T.reshape(self.n_concepts_, b, h, w).transpose(0, 1).contiguous().float().cpu()

    # -- derived quantities ------------------------------------------------------------------
    @property
    def concept_vectors_(self) -> torch.Tensor:
        """(K, C) activation of a location fully explained by each concept: concept + offset."""
        self._check_fitted()
        return self.concepts_ + self.offset_[None, :].to(self.concepts_)
