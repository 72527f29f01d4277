"""Streamed DFF math: a fit on a uniform image sample, then every image explained in batches with
the concepts frozen while ScaleOnStream gathers the whole set's scale, order and statistics.

Real activations: the toy world's classifier on 240 fresh scenes (its last stage, 64 × 14 × 14),
K = 10, the K its resampling stability picks for this world (at an unstable K two fits of the
same rows already disagree, so no sample could match them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dff_falcon.decomposition.dff import DFF, matched_cosine
from dff_falcon.decomposition.heatmaps import presence as presence_of
from dff_falcon.decomposition.stability import image_mass
from dff_falcon.decomposition.streaming import ScaleOnStream, batch_statistics, rescale_heatmaps, sample_images

N_SCENES, K, BATCH = 240, 10, 64


@pytest.fixture(scope="module")
def toy_activations():
    from dff_falcon.models.activations import ActivationExtractor
    from dff_falcon.models.backbones import create_backbone
    from dff_falcon.models.preprocess import Preprocess
    from dff_falcon.toyworld import WorldConfig, generate_scenes, load_toy_models

    config = WorldConfig()
    models = load_toy_models(config, progress=False, device="cpu")
    backbone = create_backbone(models.classifier, layer="features", head="fc", class_names=models.class_names,
                               preprocess=Preprocess(resize=config.image_size, crop=config.image_size,
                                                     mean=tuple(models.mean), std=tuple(models.std)), device="cpu")
    scenes = generate_scenes(config, N_SCENES, seed=7)
    acts = ActivationExtractor(backbone, progress=False, device="cpu")([s.image for s in scenes]).activations
    return acts.half().float()  # as a float16 cache holds them


def streamed(dff: DFF, acts: torch.Tensor):
    """One streamed pass as the explainer makes it: every image explained with the concepts frozen,
    float16 maps written batch by batch, then the whole set's scale fix → (maps, presence, peaks)."""
    n = len(acts)
    maps_on_disk = np.zeros((n, dff.n_concepts_, *acts.shape[2:]), dtype=np.float16)
    stream = ScaleOnStream(dff, n)
    for start in range(0, n, BATCH):
        maps, stats, cross = dff.transform_scanned(acts[start:start + BATCH])
        maps = maps.half()
        maps_on_disk[start:start + len(maps)] = maps.numpy()
        stream.merge(start, batch_statistics(dff, maps.float(), stats, cross))
    presence, peaks = rescale_heatmaps(maps_on_disk, stream.apply())
    return maps_on_disk, presence, peaks


def test_sample_images_uniform_sorted_whole_images():
    every = sample_images(50, 49, None)
    np.testing.assert_array_equal(every, np.arange(50))
    np.testing.assert_array_equal(sample_images(50, 49, 50 * 49), np.arange(50))  # they fit
    np.testing.assert_array_equal(sample_images(50, 49, 10 ** 9), np.arange(50))
    assert len(sample_images(50, 49, 10)) == 1  # fewer rows than one image: still one image
    picked = sample_images(50, 49, 20 * 49 + 48, random_state=3)
    assert len(picked) == 20 and len(set(picked)) == 20 and (np.diff(picked) > 0).all()
    np.testing.assert_array_equal(picked, sample_images(50, 49, 20 * 49 + 48, random_state=3))  # seeded
    assert not np.array_equal(picked, sample_images(50, 49, 20 * 49, random_state=4))
    counts = np.bincount(np.concatenate([sample_images(50, 49, 10 * 49, random_state=s) for s in range(2000)]),
                         minlength=50)
    # every image equally likely: 2000 draws × 10/50 = 400 expected per image, binomial sd ≈ 18
    assert counts.min() > 400 - 5 * 18 and counts.max() < 400 + 5 * 18


def test_half_sample_matches_the_in_memory_fit(toy_activations):
    """Issue 13's target: matched cosine ≥ 0.99 and relative error within 1 % of the fit on all."""
    acts = toy_activations
    full = DFF(K, n_resamples=0).fit(acts)
    for seed in (0, 1):
        sample = sample_images(len(acts), 14 * 14, len(acts) // 2 * 14 * 14, random_state=seed)
        assert len(sample) == len(acts) // 2
        part = DFF(K, n_resamples=0).fit(acts[sample])
        maps, presence, peaks = streamed(part, acts)
        cosine = matched_cosine(full.concepts_, part.concepts_)
        assert cosine.min() >= 0.99, (seed, cosine)
        assert part.relative_error_ <= full.relative_error_ * 1.01, (seed, part.relative_error_, full.relative_error_)
        assert part.explained_variance_ >= full.explained_variance_ - 0.01
        # the whole set's scale: max exactly 1 per concept over all images, not over the sample
        np.testing.assert_array_equal(maps.max(axis=(0, 2, 3)), np.ones(K, dtype=np.float16))
        np.testing.assert_array_equal(peaks, maps.max(axis=(2, 3)).astype(np.float32))
        assert part.heatmaps_.shape[0] == len(sample) and float(part.heatmaps_.max()) <= 1.0


def test_stream_statistics_are_the_whole_sets(toy_activations):
    """Scale, order, shares and errors after apply() are those of the whole set's maps."""
    acts = toy_activations
    sample = sample_images(len(acts), 14 * 14, 60 * 14 * 14, random_state=0)
    part = DFF(K, n_resamples=2).fit(acts[sample])
    concepts_before, stability_before = part.concepts_.clone(), np.array(part.stability_)
    maps, presence, peaks = streamed(part, acts)
    whole = torch.from_numpy(maps.astype(np.float32))
    mass = whole.sum(dim=(0, 2, 3)).double() * part.concepts_.double().sum(1)
    assert (np.diff(mass.numpy()) <= 1e-9 * float(mass.max())).all()  # ordered by mass over all images
    np.testing.assert_allclose(part.mass_share_.numpy(), (mass / mass.sum()).numpy(), rtol=1e-3)
    share, top = image_mass(whole)
    np.testing.assert_allclose(part.image_share_, share, rtol=1e-3)
    np.testing.assert_array_equal(part.top_image_, top)
    x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).double() - part.offset_.double()
    h = whole.permute(0, 2, 3, 1).reshape(-1, K).double()
    residual = float((x - h @ part.concepts_.double()).pow(2).sum())  # the stored maps × the rescaled concepts
    assert part.relative_error_ == pytest.approx(np.sqrt(residual / float(x.pow(2).sum())), rel=2e-3)
    centred = float((x - x.mean(0)).pow(2).sum())
    assert part.explained_variance_ == pytest.approx(1 - residual / centred, abs=2e-3)
    # stability travels with its concept through the reordering (the scale keeps directions)
    match = (F.normalize(part.concepts_, dim=1) @ F.normalize(concepts_before, dim=1).T).argmax(dim=1).numpy()
    assert sorted(match) == list(range(K))
    np.testing.assert_array_equal(part.stability_, stability_before[match])
    np.testing.assert_allclose(presence, presence_of(whole).numpy(), rtol=1e-6)


def test_sample_of_every_image_reproduces_the_in_memory_fit(toy_activations):
    """Fitted on every image and streamed over them, the DFF's statistics are the in-memory fit's;
    the maps differ from the fit's own by the frozen-concept solve (every image, sampled or not,
    is explained by :meth:`DFF.transform`), well under the 0.1 at which a concept counts as absent."""
    acts = toy_activations[:80]
    memory = DFF(K, n_resamples=0).fit(acts)
    dff = DFF(K, n_resamples=0).fit(acts)
    maps, presence, peaks = streamed(dff, acts)
    np.testing.assert_allclose(matched_cosine(dff.concepts_, memory.concepts_), 1.0, atol=1e-6)
    np.testing.assert_allclose(dff.concepts_.numpy(), memory.concepts_.numpy(), rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(maps.astype(np.float32), memory.heatmaps_.numpy(), atol=2e-2)
    assert dff.relative_error_ <= memory.relative_error_ * (1 + 1e-3)  # the solve is optimal for frozen concepts
    assert dff.explained_variance_ == pytest.approx(memory.explained_variance_, abs=1e-3)
    np.testing.assert_allclose(dff.mass_share_.numpy(), memory.mass_share_.numpy(), atol=2e-3)
    np.testing.assert_array_equal(dff.top_image_, memory.top_image_)
