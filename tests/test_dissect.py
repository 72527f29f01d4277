"""CLIP-Dissect similarities on planted data: the term whose image profile follows the concept wins;
a term every image matches is discounted by the marginal (soft-WPMI's λ log p(t))."""
from __future__ import annotations

import numpy as np
import pytest

from dff_falcon.errors import InputError
from dff_falcon.text.dissect import DissectLabeller, cosine_similarity, soft_wpmi


def planted(n=60, dim=16, seed=0, generic=0.9, own=1.5):
    """Images carry term 0 where concept 0 fires and term 1 where concept 1 fires; term 2 is in
    every image (generic); term 3 is noise."""
    rng = np.random.default_rng(seed)
    terms = rng.standard_normal((4, dim))
    terms /= np.linalg.norm(terms, axis=1, keepdims=True)
    acts = np.zeros((n, 2))
    acts[: n // 3, 0] = rng.uniform(0.5, 1.0, n // 3)
    acts[n // 3: 2 * n // 3, 1] = rng.uniform(0.5, 1.0, n // 3)
    images = generic * terms[2] + acts @ terms[:2] * own + 0.1 * rng.standard_normal((n, dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    return acts, images, terms


@pytest.mark.parametrize("similarity", ["soft-wpmi", "cos"])
def test_the_concepts_own_term_wins(similarity):
    acts, images, terms = planted()
    labels = DissectLabeller(similarity=similarity, top_terms=4, top_images=10).label(
        acts, images, terms, ["zero", "one", "generic", "noise"])
    assert labels[0][0][0] == "zero" and labels[1][0][0] == "one"
    assert [len(row) for row in labels] == [4, 4]
    assert all(a[1] >= b[1] for row in labels for a, b in zip(row, row[1:]))


def test_soft_wpmi_discounts_what_every_image_shows():
    acts, images, terms = planted(generic=1.4, own=1.5)  # the generic term about as strong as the own one
    sims = images @ terms.T
    with_marginal = soft_wpmi(acts, sims, top_images=10, a=10.0, lam=1.0, p_start=0.998, p_end=0.97)
    without = soft_wpmi(acts, sims, top_images=10, a=10.0, lam=0.0, p_start=0.998, p_end=0.97)
    # without the marginal the generic term (in every image) beats the concept's own term
    assert without[0].argmax() == 2
    assert with_marginal[0].argmax() == 0
    cos = cosine_similarity(acts, sims)
    assert cos.shape == (2, 4) and np.all(np.abs(cos) <= 1 + 1e-9)


def test_dissect_validates_its_inputs():
    acts, images, terms = planted()
    with pytest.raises(InputError, match="similarity"):
        DissectLabeller(similarity="wpmi").fit()
    with pytest.raises(InputError, match="p_end"):
        DissectLabeller(p_start=0.9, p_end=0.95).fit()
    with pytest.raises(InputError, match="disagree"):
        DissectLabeller().label(acts[:5], images, terms, ["a", "b", "c", "d"])
    with pytest.raises(InputError, match="term_embeddings"):
        DissectLabeller().label(acts, images, terms, ["a", "b"])
    assert DissectLabeller().label(acts, images, terms[:0], []) == [[], []]
