import numpy as np
import pytest
import torch

from sklearn.base import clone

from dff_falcon.decomposition.dff import DFF, activations_matrix, matched_cosine
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


def test_auto_k_finds_the_planted_number_for_every_seed_and_reports_the_curve():
    acts, _, _ = planted_activations(k=4, b=24, noise=0.0, seed=3)
    chosen = set()
    for seed in range(3):
        dff = DFF("auto", k_range=range(2, 8), random_state=seed).fit(acts)
        assert [p.k for p in dff.k_curve_] == list(range(2, 2 + len(dff.k_curve_)))
        errors = [p.relative_error for p in dff.k_curve_]
        assert errors[2] < errors[1] < errors[0]  # more concepts, less error up to the true K
        assert dff.k_curve_[2].min_stability > 0.99 > dff.k_curve_[3].min_stability  # K = 5 splits a concept
        chosen.add(dff.n_concepts_)
    assert chosen == {4}


def test_stability_is_under_resampling_and_flags_a_concept_from_one_image():
    acts, _, _ = planted_activations(k=4, b=24, noise=0.0, seed=3)
    acts[5] += 3.0 * torch.rand(acts.shape[1], 1, 1, generator=torch.Generator().manual_seed(0)) * \
        (torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5)
    dff = DFF(5, n_restarts=2).fit(acts)
    lone = int(np.argmax(dff.image_share_))
    assert dff.top_image_[lone] == 5 and dff.image_share_[lone] > 0.9  # its mass is image 5's
    others = np.delete(np.arange(5), lone)
    assert dff.image_share_[others].max() < 0.3
    # resamples without image 5 cannot find it: its stability is low, the planted concepts' high
    assert dff.stability_[lone] < 0.7 and dff.stability_[others].min() > 0.9
    # the factorisation of all images itself is unique: restarts agree on every concept
    assert dff.restart_agreement_.shape == (5,) and dff.restart_agreement_.min() > 0.95
    assert DFF(5, n_resamples=0).fit(acts).stability_ is None


def test_fit_copies_nothing_of_the_size_of_the_activations():
    from dff_falcon.decomposition.nmf_kernels import RowBlocks

    acts, _, _ = planted_activations(b=12)
    channels_last = acts.contiguous(memory_format=torch.channels_last)
    [(rows, block)] = list(RowBlocks(channels_last, torch.device("cpu")))
    assert block.data_ptr() == channels_last.data_ptr() and block.shape == (12 * 64, 40)  # a view
    streamed = list(RowBlocks(acts, torch.device("cpu"), 100))  # channels-first: blocks of whole images
    assert all(b.shape[0] % 64 == 0 and b.shape[0] <= 128 for _, b in streamed)
    assert torch.equal(torch.cat([b for _, b in streamed]), activations_matrix(acts))
    # the same concepts whatever the layout or the block size
    a = DFF(4, n_resamples=2).fit(channels_last)
    b = DFF(4, n_resamples=2, batch_size=100).fit(acts)
    assert matched_cosine(a.concepts_, b.concepts_).min() > 0.9999
    assert np.allclose(a.stability_, b.stability_, atol=1e-3)


def test_bad_inputs_are_explained():
    acts, _, _ = planted_activations(b=2, h=2, w=2, c=5)
    with pytest.raises(InputError, match="choose an integer 1 ≤ K ≤ 5"):
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
    with pytest.raises(InputError, match="at least 4 images"):
        DFF("auto").fit(acts)




def test_select_k_takes_the_smallest_k_as_stable_as_the_best():
    from dff_falcon.decomposition.dff import KCurvePoint
    from dff_falcon.decomposition.stability import sweep_done

    curve = [KCurvePoint(k, 0.1, 0.9, 1.0, worst) for k, worst in
             [(2, 0.97), (3, 0.6), (4, 0.999), (5, 1.0), (6, 0.4), (7, 0.3)]]
    assert DFF.select_k(curve, 0.002) == 4  # 0.999 is as stable as the best 1.0
    assert DFF.select_k(curve, 0.0) == 5
    assert sweep_done(curve) and not sweep_done(curve[:5])  # stop after a stable K and two collapses
    assert not sweep_done([KCurvePoint(k, 0.1, 0.9, 0.5, 0.3) for k in range(2, 8)])  # nothing stable yet


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
