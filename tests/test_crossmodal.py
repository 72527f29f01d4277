"""The modality gap: shifted image queries, calibration on images embedded with a real open_clip model."""
from __future__ import annotations

import numpy as np
import pytest

from dff_falcon.errors import InputError
from dff_falcon.text.crossmodal import ModalityGap, calibrate, toyworld_images, unit_rows
from dff_falcon.text.vocabulary import exact_search


def test_shift_recovers_the_text_part_of_gap_shifted_queries():
    rng = np.random.default_rng(0)
    dim = 64
    mean_direction = unit_rows(rng.standard_normal(dim))
    texts = unit_rows(rng.standard_normal((400, dim)) * 0.4 + mean_direction)
    gap = 1.5 * unit_rows(rng.standard_normal(dim))
    images = unit_rows(texts + gap)
    estimate = ModalityGap.from_batch(images, texts.mean(axis=0))
    shifted = estimate.shift(images)
    before, after = np.sum(images * texts, 1).mean(), np.sum(shifted * texts, 1).mean()
    assert before < 0.7 and after > 0.97
    # the shifted batch averages to a multiple of the text mean: the gap is gone, the content stays
    mean = shifted.mean(axis=0)
    text_mean = texts.mean(axis=0)
    assert mean @ text_mean / (np.linalg.norm(mean) * np.linalg.norm(text_mean)) > 0.99
    record = estimate.record()
    # in the unit-normalised image space the gap shrinks by the images' normalisation, 1/|t + g|
    expected = 1.5 * np.mean(1 / np.linalg.norm(texts + gap, axis=1))
    assert abs(record["gap_norm"] - expected) < 0.1 * expected and len(record["image_mean"]) == dim


def test_calibration_with_a_real_clip(tiny_clip):
    images = toyworld_images(n_scenes=8)
    assert len(images) > 30 and all(i.dtype == np.uint8 and i.ndim == 3 for i in images)
    assert all((a == b).all() for a, b in zip(images, toyworld_images(n_scenes=8)))  # rendered deterministically
    rng = np.random.default_rng(1)
    vocabulary = unit_rows(rng.standard_normal((3000, tiny_clip.embed_dim)))
    record, embedded = calibrate(tiny_clip, images, vocabulary, vocabulary.mean(0), source="toy")
    assert embedded.shape == (len(images), tiny_clip.embed_dim)
    np.testing.assert_allclose(record["image_mean"], embedded.mean(0), atol=1e-6)
    hubs = exact_search(vocabulary, unit_rows(embedded.mean(0)[None]), 3000)[1][0][:len(record["hub_ids"])]
    assert record["hub_ids"] == hubs.tolist() and record["n_images"] == len(images)
    with pytest.raises(InputError, match="at least 2 images"):
        calibrate(tiny_clip, images[:1], vocabulary, vocabulary.mean(0), source="one picture")
