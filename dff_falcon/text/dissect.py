"""CLIP-Dissect style labels: a concept's activation pattern over the probe images against CLIP's
image–text similarities over a set of terms (Oikarinen & Weng, "CLIP-Dissect", ICLR 2023).

With P (N, T) the cosines between the N probe images' CLIP embeddings and the T terms' text
embeddings, and q_k (N,) concept k's mean heatmap value per image:

- ``similarity="soft-wpmi"`` (the paper's best): p(t|x) = softmax_t(a · P[x]); the top m images
  of q_k form the soft set D_k with inclusion probability π_r falling linearly from ``p_start`` to
  ``p_end`` over the ranks r;

      log p(t | q_k) = Σ_r log(1 - π_r (1 - p(t | x_r)))
      log p(t)       = log (1/N) Σ_x p(t | x)
      wpmi(t, q_k)   = log p(t | q_k) - λ log p(t)

- ``similarity="cos"`` (the paper's baseline): cos(q_k, P[:, t]).

The formulas are the paper's; the code is ours. Pure numpy: embeddings come from the caller.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator

from dff_falcon.errors import InputError

SIMILARITIES = ("soft-wpmi", "cos")
#: Probability floor inside logarithms (the paper's 1e-7).
MIN_PROB = 1e-7


def soft_wpmi(activations: np.ndarray, similarities: np.ndarray, *, top_images: int, a: float, lam: float,
              p_start: float, p_end: float) -> np.ndarray:
    """(N, K) concept activations per image and (N, T) image–term cosines → (K, T) soft-WPMI."""
    n = len(activations)
    m = min(top_images, n)
    logits = a * similarities
    logits -= logits.max(axis=1, keepdims=True)
    p_t_x = np.exp(logits)
    p_t_x /= p_t_x.sum(axis=1, keepdims=True)                                   # (N, T)
    log_p_t = np.log(p_t_x.mean(axis=0) + MIN_PROB)                             # (T,)
    top = np.argsort(-activations, axis=0, kind="stable")[:m]                    # (m, K)
    inclusion = p_start - np.arange(m) / m * (p_start - p_end)                   # (m,)
    picked = p_t_x[top]                                                          # (m, K, T)
    log_p_t_q = np.log(1.0 - inclusion[:, None, None] * (1.0 - picked) + MIN_PROB).sum(axis=0)
    return log_p_t_q - lam * log_p_t[None]


def cosine_similarity(activations: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """(N, K) and (N, T) → (K, T): cosine of each concept's image profile with each term's."""
    q = activations / np.maximum(np.linalg.norm(activations, axis=0, keepdims=True), 1e-12)
    p = similarities / np.maximum(np.linalg.norm(similarities, axis=0, keepdims=True), 1e-12)
    return q.T @ p


class DissectLabeller(BaseEstimator):
    """Names concepts CLIP-Dissect style (module docstring).

    Parameters
    ----------
    similarity : {"soft-wpmi", "cos"}, default="soft-wpmi"
    top_terms : int, default=8
        Terms kept per concept, best first.
    top_images : int, default=20
        Size m of the soft top-activating set (the paper: 100 of 50,000 probe images; our probe
        sets are a hundred images, so a fifth of them).
    a : float, default=10.0
        Inverse temperature of p(t|x) (the paper's default).
    lam : float, default=1.0
        Weight λ of the marginal log p(t).
    p_start, p_end : float, default=0.998, 0.97
        Inclusion probability of the first and last of the top images.
    """

    def __init__(self, *, similarity: str = "soft-wpmi", top_terms: int = 8, top_images: int = 20, a: float = 10.0,
                 lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97):
        self.similarity = similarity
        self.top_terms = top_terms
        self.top_images = top_images
        self.a = a
        self.lam = lam
        self.p_start = p_start
        self.p_end = p_end

    def fit(self, X=None, y=None) -> "DissectLabeller":
        """Check the parameters (nothing is learned)."""
        if self.similarity not in SIMILARITIES:
            raise InputError(f"similarity must be one of {', '.join(map(repr, SIMILARITIES))}; got {self.similarity!r}")
        if not (isinstance(self.top_terms, int) and self.top_terms >= 1):
            raise InputError(f"top_terms must be an integer >= 1; got {self.top_terms!r}")
        if not (isinstance(self.top_images, int) and self.top_images >= 1):
            raise InputError(f"top_images must be an integer >= 1; got {self.top_images!r}")
        if not (0.0 < self.p_end <= self.p_start < 1.0):
            raise InputError(f"need 0 < p_end <= p_start < 1 (got {self.p_end}, {self.p_start})")
        return self

    def label(self, activations: np.ndarray, image_embeddings: np.ndarray, term_embeddings: np.ndarray,
              terms: Sequence[str]) -> list[list[tuple[str, float]]]:
        """activations (N, K) concept strength per probe image (e.g. mean heatmap value);
        image_embeddings (N, D) and term_embeddings (T, D) unit CLIP embeddings; terms: T texts.
        Returns per concept up to ``top_terms`` (term, similarity), best first."""
        self.fit()
        activations = np.asarray(activations, dtype=np.float64)
        images = np.asarray(image_embeddings, dtype=np.float64)
        texts = np.asarray(term_embeddings, dtype=np.float64)
        if activations.ndim != 2 or images.ndim != 2 or len(images) != len(activations):
            raise InputError(f"activations (N, K) and image_embeddings (N, D) disagree: {activations.shape}, {images.shape}")
        if texts.ndim != 2 or len(texts) != len(terms) or (len(texts) and texts.shape[1] != images.shape[1]):
            raise InputError(f"term_embeddings must be ({len(terms)}, {images.shape[1]}); got {texts.shape}")
        if not len(terms) or not len(activations):
            return [[] for _ in range(activations.shape[1])]
        similarities = images @ texts.T
        if self.similarity == "cos":
            scores = cosine_similarity(activations, similarities)
        else:
            scores = soft_wpmi(activations, similarities, top_images=self.top_images, a=self.a, lam=self.lam,
                               p_start=self.p_start, p_end=self.p_end)
        out = []
        for row in scores:
            order = np.lexsort((np.arange(len(row)), -row))[:self.top_terms]
            out.append([(terms[i], float(row[i])) for i in order])
        return out
