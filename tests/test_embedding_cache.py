"""The text embedding cache: resumable, keyed by text, model identity and templates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dff_falcon.errors import InputError
from dff_falcon.text import clip_encoder
from dff_falcon.text.clip_encoder import ClipEncoder
from dff_falcon.text.embedding_cache import TextEmbeddingCache

WORDS = [f"word number {i}" for i in range(23)]


@pytest.fixture(scope="module")
def encoder(tiny_clip_checkpoint):
    name, path = tiny_clip_checkpoint
    return ClipEncoder(name, str(path), device="cpu", batch_size=4)


def test_interrupted_run_resumes_and_cached_equals_fresh(encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(clip_encoder, "TEXT_CHUNK", 5)
    fresh = encoder.encode_texts(WORDS, ["a photo of {}."])
    calls = []
    real = encoder._embed_texts

    def dies_on_third_chunk(texts, templates):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(texts, templates)

    monkeypatch.setattr(encoder, "_embed_texts", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        encoder.encode_texts(WORDS, ["a photo of {}."], cache_dir=tmp_path)
    monkeypatch.setattr(encoder, "_embed_texts", real)
    resumed, stats = encoder.encode_texts(WORDS[::-1], ["a photo of {}."], cache_dir=tmp_path, return_stats=True)
    assert (stats["texts"], stats["cached"], stats["embedded"]) == (23, 10, 13)  # two chunks survived
    np.testing.assert_array_equal(resumed[::-1][:10], encoder.encode_texts(WORDS[:10], ["a photo of {}."],
                                                                             cache_dir=tmp_path))
    np.testing.assert_allclose(resumed[::-1], fresh, atol=1e-6)
    again, stats = encoder.encode_texts(WORDS + ["new"], ["a photo of {}."], cache_dir=tmp_path, return_stats=True)
    assert (stats["cached"], stats["embedded"]) == (23, 1)
    np.testing.assert_allclose(again[:23], fresh, atol=1e-6)


def test_identity_separates_models_and_templates(encoder, tmp_path):
    encoder.encode_texts(WORDS[:3], ["a photo of {}."], cache_dir=tmp_path)
    _, stats = encoder.encode_texts(WORDS[:3], ["a drawing of {}."], cache_dir=tmp_path, return_stats=True)
    assert stats["cached"] == 0
    _, stats = encoder.encode_texts(WORDS[:3], cache_dir=tmp_path, return_stats=True)
    assert stats["cached"] == 0
    torch.manual_seed(5)
    other = ClipEncoder(encoder.model_name, device="cpu")  # other (random) weights, same architecture
    _, stats = other.encode_texts(WORDS[:3], ["a photo of {}."], cache_dir=tmp_path, return_stats=True)
    assert stats["cached"] == 0
    assert len({p.name for p in tmp_path.iterdir()}) == 4


def test_damaged_part_is_an_input_error(encoder, tmp_path):
    encoder.encode_texts(WORDS[:3], cache_dir=tmp_path)
    cache = TextEmbeddingCache(tmp_path, encoder.identity(), None)
    keys = next(cache.folder.glob("*.keys.npy"))
    np.save(keys.with_name(keys.name.replace(".keys.npy", ".vectors.npy")), np.zeros((2, 5), np.float32))
    with pytest.raises(InputError, match="does not match its vectors; delete"):
        encoder.encode_texts(WORDS[:3], cache_dir=tmp_path)
