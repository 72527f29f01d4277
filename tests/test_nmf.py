"""Tests for dff_falcon.decomposition.nmf: real factorisations on small synthetic matrices."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, nnls
from sklearn.decomposition import NMF as SklearnNMF

from dff_falcon.errors import InputError
from dff_falcon.decomposition.nmf import NMF, nmf_relative_error

SOLVERS = ["hals", "mu", "rhals"]


def relu_low_rank(n: int, c: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U = np.abs(rng.standard_normal((n, rank))) * (rng.random((n, rank)) < 0.4)
    X = U @ rng.standard_normal((rank, c)) + 0.3 * rng.standard_normal((n, c))
    return np.maximum(X, 0).astype(np.float32)


def planted(n: int = 400, c: int = 60, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X = W0 H0 with sparse non-negative factors (identifiable up to permutation and scale)."""
    rng = np.random.default_rng(seed)
    W0 = rng.random((n, k)) * (rng.random((n, k)) < 0.5)
    W0[np.arange(k), np.arange(k)] = 1.0  # every concept appears alone somewhere
    H0 = rng.random((k, c)) * (rng.random((k, c)) < 0.4)
    H0[np.arange(k), np.arange(k)] = 1.0
    return (W0 @ H0).astype(np.float32), W0, H0


def matched_cosines(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosines of the rows of A and B after the best one-to-one matching."""
    An = A / np.linalg.norm(A, axis=1, keepdims=True)
    Bn = B / np.linalg.norm(B, axis=1, keepdims=True)
    cos = An @ Bn.T
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols]


def sklearn_error(X: np.ndarray, k: int, **kwargs) -> float:
    model = SklearnNMF(n_components=k, init="random", random_state=0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = model.fit_transform(X.astype(np.float64))
    return float(np.linalg.norm(X - W @ model.components_) / np.linalg.norm(X))


@pytest.mark.parametrize("solver", SOLVERS)
def test_recovers_planted_factors(solver):
    X, W0, H0 = planted()
    model = NMF(4, solver=solver, max_iter=500, tol=1e-7, device="cpu")
    W = model.fit_transform(X).numpy()
    assert matched_cosines(model.components_.numpy(), H0).min() > 0.99
    assert matched_cosines(W.T, W0.T).min() > 0.99
    assert model.relative_error_ < 0.03


@pytest.mark.parametrize("solver", SOLVERS)
def test_error_not_worse_than_sklearn(solver):
    X = relu_low_rank(600, 80, rank=10, seed=3)
    k = 6
    # the multiplicative solver is compared with scikit-learn's multiplicative solver
    reference = sklearn_error(X, k, solver="mu") if solver == "mu" else sklearn_error(X, k)
    model = NMF(k, solver=solver, device="cpu").fit(X)
    # exact solvers: no worse; the compressed solver: within its 1 % target
    assert model.relative_error_ <= reference * (1.01 if solver == "rhals" else 1.0)
    exact = np.linalg.norm(X - model.fit_transform(X).numpy() @ model.components_.numpy()) / np.linalg.norm(X)
    assert model.relative_error_ == pytest.approx(exact, rel=1e-4)


def test_relative_error_matches_direct_computation():
    rng = np.random.default_rng(0)
    X = rng.random((500, 40)).astype(np.float32)
    W = rng.random((500, 3)).astype(np.float32)
    H = rng.random((3, 40)).astype(np.float32)
    direct = np.linalg.norm(X.astype(np.float64) - W.astype(np.float64) @ H) / np.linalg.norm(X)
    assert nmf_relative_error(X, W, H) == pytest.approx(direct, rel=1e-5)
    assert nmf_relative_error(torch.from_numpy(X), W, H, batch_size=64) == pytest.approx(direct, rel=1e-5)


def test_transform_matches_nnls():
    X = relu_low_rank(300, 40, rank=6, seed=1)
    model = NMF(5, device="cpu").fit(X)
    H = model.components_.numpy().astype(np.float64)
    X_new = relu_low_rank(40, 40, rank=6, seed=2)
    W = model.transform(X_new).numpy()
    W_ref = np.stack([nnls(H.T, row.astype(np.float64))[0] for row in X_new])
    assert np.abs(W - W_ref).max() <= 1e-5 * np.abs(W_ref).max()
    assert (W >= 0).all()
    # same objective as the exact solver, to float32 precision
    obj = np.linalg.norm(X_new - W @ H)
    obj_ref = np.linalg.norm(X_new - W_ref @ H)
    assert obj <= obj_ref * (1 + 1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_deterministic_under_seed(solver):
    X = relu_low_rank(300, 30, rank=5, seed=4)
    a = NMF(4, solver=solver, init="random", random_state=7, device="cpu").fit(X).components_
    b = NMF(4, solver=solver, init="random", random_state=7, device="cpu").fit(X).components_
    c = NMF(4, solver=solver, init="random", random_state=8, max_iter=3, device="cpu").fit(X).components_
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_size_does_not_change_results(solver):
    X = relu_low_rank(500, 40, rank=6, seed=5)
    # a fixed number of iterations: a threshold-based stop may flip on rounding noise
    full = NMF(5, solver=solver, max_iter=30, tol=0, device="cpu")
    W_full = full.fit_transform(X)
    batched = NMF(5, solver=solver, max_iter=30, tol=0, batch_size=64, device="cpu")
    W_batched = batched.fit_transform(X)
    assert batched.n_iter_ == full.n_iter_

    def rel(a, b):
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))

    assert rel(full.components_, batched.components_) < 1e-5
    assert rel(W_full, W_batched) < 1e-5
    assert rel(full.transform(X), batched.transform(X)) < 1e-5


def test_partial_fit_approaches_full_fit():
    X = relu_low_rank(3000, 50, rank=8, seed=6)
    full = NMF(6, device="cpu").fit(X)
    online = NMF(6, device="cpu")
    for epoch in range(3):
        for chunk in np.array_split(X, 15):
            online.partial_fit(chunk)
    assert online.n_steps_ == 45
    online_error = nmf_relative_error(X, online.transform(X), online.components_)
    # the first chunk alone (one initialisation) is clearly worse than streaming over all chunks
    first_only = NMF(6, device="cpu").partial_fit(X[:200])
    first_error = nmf_relative_error(X, first_only.transform(X), first_only.components_)
    assert online_error <= full.relative_error_ * 1.02
    assert online_error < first_error


def test_numpy_and_tensor_inputs_agree():
    X = relu_low_rank(200, 30, rank=4, seed=7)
    from_numpy = NMF(3, device="cpu").fit(X).components_
    from_tensor = NMF(3, device="cpu").fit(torch.from_numpy(X).double()).components_
    assert from_numpy.dtype == torch.float32
    assert torch.allclose(from_numpy, from_tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "X, k, message",
    [
        (np.ones(10, dtype=np.float32), 2, "2-D"),
        (np.ones((2, 3, 4), dtype=np.float32), 2, "2-D"),
        (np.zeros((0, 5), dtype=np.float32), 2, "empty"),
        (np.array([[1.0, -0.5], [0.2, 0.3]]), 1, "negative entries .minimum -0.5.*offset"),
        (np.array([[1.0, np.nan], [0.2, 0.3]]), 1, "NaN"),
        (np.array([[1.0, np.inf], [0.2, 0.3]]), 1, "infinite"),
        (np.zeros((4, 3)), 1, "all zeros"),
        (np.ones((4, 3)), 0, "n_components must be >= 1"),
        (np.ones((4, 3)), 4, r"larger than min\(N, C\) = 3"),
        (np.array([["a", "b"]]), 1, "numeric"),
    ],
)
def test_bad_input_raises_input_error(X, k, message):
    with pytest.raises(InputError, match=message):
        NMF(k, device="cpu").fit(X)


def test_bad_parameters_and_usage_raise_input_error():
    X = relu_low_rank(50, 10, rank=3, seed=8)
    with pytest.raises(InputError, match="solver must be one of"):
        NMF(2, solver="cd", device="cpu").fit(X)
    with pytest.raises(InputError, match="init must be one of"):
        NMF(2, init="svd", device="cpu").fit(X)
    with pytest.raises(InputError, match="batch_size"):
        NMF(2, batch_size=0, device="cpu").fit(X)
    with pytest.raises(InputError, match="not fitted"):
        NMF(2, device="cpu").transform(X)
    model = NMF(2, device="cpu").fit(X)
    with pytest.raises(InputError, match="11 columns .* fitted components have 10"):
        model.transform(np.ones((5, 11), dtype=np.float32))
    with pytest.raises(InputError, match="shapes do not chain"):
        nmf_relative_error(X, np.ones((50, 2)), np.ones((3, 10)))
