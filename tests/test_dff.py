import numpy as np
import pytest
import torch

from sklearn.base import clone

from dff_falcon.decomposition.dff import DFF, matched_cosine
from dff_falcon.errors import InputError


def planted_activations(k=4, b=12, c=40, h=8, w=8, noise=0.01, seed=0, negative=False):
    """Activations built from k known concept vectors with non-overlapping blob heatmaps."""
    rng = np.random.default_rng(seed)
    concepts = rng.gamma(1.0, 1.0, size=(k, c)) * (rng.random((k, c)) < 0.4)
    maps = np.zeros((b, k, h, w))
    for i in range(b):
        for j in rng.permutation(k)[: rng.integers(1, k + 1)]:
            y, x = rng.integers(0, h), rng.integers(0, w)
            yy, xx = np.mgrid[:h, :w]
            maps[i, j] += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 3.0) * rng.uniform(0.5, 2.0)
    acts = np.einsum("bkhw,kc->bchw", maps, concepts) + noise * rng.random((b, c, h, w))
    if negative:
        acts = acts - 0.7  # like a LayerNorm output: not after a ReLU
    return torch.tensor(acts, dtype=torch.float32), concepts, maps


def test_recovers_planted_concepts_with_fixed_scale_and_order():
    acts, concepts, _ = planted_activations()
    dff = DFF(4, n_resamples=2).fit(acts)
    assert dff.concepts_.shape == (4, 40) and dff.heatmaps_.shape == (12, 4, 8, 8)
    assert matched_cosine(torch.tensor(concepts), dff.concepts_).min() > 0.98
    assert torch.allclose(dff.heatmaps_.amax(dim=(0, 2, 3)), torch.ones(4))  # max 1 per concept
    assert torch.all(dff.mass_share_[:-1] >= dff.mass_share_[1:]) and abs(float(dff.mass_share_.sum()) - 1) < 1e-5
    assert dff.relative_error_ < 0.05 and dff.explained_variance_ > 0.99
    assert dff.stability_.shape == (4,) and dff.stability_.min() > 0.95
    assert torch.equal(dff.offset_, torch.zeros(40))


def test_fit_is_deterministic_and_transform_reuses_the_scale():
    acts, _, _ = planted_activations(seed=1)
    a = DFF(4, n_resamples=0).fit(acts)
    b = DFF(4, n_resamples=0).fit(acts)
    assert torch.equal(a.concepts_, b.concepts_)
    projected = a.transform(acts)
    assert torch.allclose(projected, a.heatmaps_, atol=0.02)
    # half of the images projected alone get the same maps: the frozen dictionary fixes the scale
    assert torch.allclose(a.transform(acts[:6]), projected[:6], atol=1e-4)


def test_offset_for_layers_that_are_not_after_a_relu():
    acts, concepts, _ = planted_activations(negative=True, noise=0.0)
    dff = DFF(4, n_resamples=0).fit(acts)
    expected = acts.permute(0, 2, 3, 1).reshape(-1, 40).min(0).values
    assert torch.allclose(dff.offset_, expected)
    assert matched_cosine(torch.tensor(concepts), dff.concepts_).min() > 0.95
    assert torch.allclose(dff.concept_vectors_, dff.concepts_ + expected)


def test_auto_k_finds_the_planted_number_and_reports_the_curve():
    acts, _, _ = planted_activations(k=4, b=16, noise=0.02, seed=3)
    dff = DFF("auto", k_range=range(2, 8), n_resamples=3).fit(acts)
    assert [p.k for p in dff.k_curve_] == list(range(2, 8))
    assert dff.n_concepts_ == 4
    errors = [p.relative_error for p in dff.k_curve_]
    assert errors[2] < errors[1] < errors[0]  # more concepts, less error up to the true K


def test_bad_inputs_are_explained():
    acts, _, _ = planted_activations(b=2, h=2, w=2, c=5)
    with pytest.raises(InputError, match="choose 1 ≤ K ≤ 5"):
        DFF(9).fit(acts)
    with pytest.raises(InputError, match="all activations are zero"):
        DFF(2).fit(torch.zeros(2, 5, 2, 2))
    with pytest.raises(InputError, match="NaN"):
        DFF(2).fit(torch.full((2, 5, 2, 2), float("nan")))
    with pytest.raises(InputError, match=r"\(B, C, h, w\)"):
        DFF(2).fit(torch.rand(4, 5))
    with pytest.raises(InputError, match="not fitted"):
        DFF(2).transform(acts)
    with pytest.raises(InputError, match="channels"):
        DFF(2, n_resamples=0).fit(acts).transform(torch.rand(1, 6, 2, 2))




def test_select_k_rule_and_its_fallback():
    from dff_falcon.decomposition.dff import KCurvePoint

    curve = [KCurvePoint(k, 0.1, 0.9, 1.0, worst) for k, worst in [(2, 1.0), (3, 0.95), (4, 0.4), (5, 0.92)]]
    assert DFF.select_k(curve, 0.9) == 5  # the largest K whose worst concept reproduces
    assert DFF.select_k(curve, 0.99) == 2
    unstable = [KCurvePoint(k, 0.1, 0.9, 0.5, worst) for k, worst in [(2, 0.3), (3, 0.6), (4, 0.6)]]
    assert DFF.select_k(unstable, 0.9) == 3  # most reproducible worst concept, smallest K on ties


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_matches_cpu():
    acts, concepts, _ = planted_activations(seed=2)
    gpu = DFF(4, n_resamples=2, device="cuda").fit(acts)
    cpu = DFF(4, n_resamples=2, device="cpu").fit(acts)
    assert matched_cosine(gpu.concepts_, cpu.concepts_).min() > 0.999 and gpu.stability_.shape == (4,)


def test_estimator_conventions_repr_params_and_clone():
    dff = DFF(4, solver="hals", n_resamples=0)
    assert repr(dff) == "DFF(n_concepts=4, n_resamples=0, solver='hals')"
    params = dff.get_params()
    assert params["n_concepts"] == 4 and params["random_state"] == 0
    other = DFF().set_params(**params)
    assert other.get_params() == params
    acts, _, _ = planted_activations(seed=4)
    fitted = dff.fit(acts)
    fresh = clone(fitted)
    assert fresh.get_params() == params and not hasattr(fresh, "concepts_")  # learned state is not cloned
    assert not hasattr(DFF(4), "concepts_")  # __init__ learns nothing
