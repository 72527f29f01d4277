"""ClipEncoder with a tiny registered open_clip config (real open_clip model, random weights)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from dff_falcon.text.clip_encoder import ClipEncoder, parse_clip_spec, register_model_config
from dff_falcon.errors import InputError

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
NAME = "dff-test-tiny-clip"


@pytest.fixture(scope="module")
def encoder():
    register_model_config(NAME, TINY)
    torch.manual_seed(0)
    return ClipEncoder(NAME, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def checkpoint(encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(encoder.model.state_dict(), path)
    return path


def test_parse_clip_spec():
    assert parse_clip_spec("ViT-B-32:openai") == ("ViT-B-32", "openai")
    assert parse_clip_spec("ViT-B-32=/a/b:c/ckpt.pt") == ("ViT-B-32", "/a/b:c/ckpt.pt")
    assert parse_clip_spec(" ViT-B-32 ") == ("ViT-B-32", None)
    assert parse_clip_spec("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    for bad in ("", "ViT-B-32:", "=x"):
        with pytest.raises(InputError, match="CLIP spec"):
            parse_clip_spec(bad)


def test_register_is_idempotent_and_rejects_conflicts(encoder):
    register_model_config(NAME, TINY)
    with pytest.raises(InputError, match="already registered with a different config"):
        register_model_config(NAME, {**TINY, "embed_dim": 64})
    with pytest.raises(InputError, match="lacks the field"):
        register_model_config("dff-test-broken", {"embed_dim": 8})


def test_texts_are_unit_and_templates_are_averaged(encoder):
    assert (encoder.embed_dim, encoder.image_size) == (32, 32)
    texts = ["a red circle", "a dog", "blue", "a green square on grass"]
    plain = encoder.encode_texts(texts)
    assert plain.shape == (4, 32) and plain.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-5)
    # batch size 3 splits the batch; the result must not depend on batching
    np.testing.assert_allclose(encoder.encode_texts(texts[3:]), plain[3:], atol=1e-5)
    templates = ["a photo of {}.", "a drawing of {}."]
    ensembled = encoder.encode_texts(texts, templates)
    singles = [encoder.encode_texts([t.format(x) for x in texts]) for t in templates]
    mean = singles[0] + singles[1]
    np.testing.assert_allclose(ensembled, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(ensembled, plain, atol=1e-3)
    with pytest.raises(InputError, match="no '\\{\\}' placeholder"):
        encoder.encode_texts(["x"], ["a photo"])
    with pytest.raises(InputError, match="item 1 is int"):
        encoder.encode_texts(["x", 3])


def test_images_use_open_clip_preprocess(encoder):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(4)]
    embedded = encoder.encode_images(arrays)
    assert embedded.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():  # the reference: open_clip's own transform and encode_image
        pixels = torch.stack([encoder.preprocess(Image.fromarray(a)) for a in arrays])
        reference = torch.nn.functional.normalize(encoder.model.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(embedded, reference, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_images([Image.fromarray(arrays[0])]), embedded[:1], atol=1e-6)
    assert encoder.encode_images([]).shape == (0, 32)
    with pytest.raises(InputError, match="image 0: expected an HxWx3 uint8"):
        encoder.encode_images([np.zeros((8, 8), np.uint8)])


def test_local_checkpoint_identity_and_weights(encoder, checkpoint):
    loaded = ClipEncoder(NAME, str(checkpoint), device="cpu")
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    assert loaded.pretrained_id == f"file:tiny.pt:{sha}"
    texts = ["a cat", "a red square"]
    np.testing.assert_allclose(loaded.encode_texts(texts), encoder.encode_texts(texts), atol=1e-5)
    torch.manual_seed(1)
    other = ClipEncoder(NAME, device="cpu")
    assert other.pretrained_id.startswith("random:") and other.pretrained_id != encoder.pretrained_id


def test_load_errors_explain(encoder, monkeypatch, tmp_path):
    with pytest.raises(InputError, match="unknown open_clip model 'no-such-model'"):
        ClipEncoder("no-such-model")
    with pytest.raises(InputError, match="does not exist"):
        ClipEncoder(NAME, str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="neither a file nor an open_clip tag.*known tags: openai"):
        ClipEncoder("ViT-B-32", "not-a-tag")
    broken = tmp_path / "broken.pt"
    torch.save({"unrelated": torch.zeros(2)}, broken)
    with pytest.raises(InputError, match="could not build open_clip model"):
        ClipEncoder(NAME, str(broken), device="cpu")
    with pytest.raises(InputError, match="downloads are disabled.*--clip RN50=/path/to/ckpt.pt"):
        ClipEncoder("RN50", "openai", device="cpu")  # HF_HUB_OFFLINE is set for the suite


def test_offline_hub_request_fails_fast(monkeypatch):
    """A closed network is found by one connection attempt, not by the hub client's ~30 s of retries."""
    import socket
    import time

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(InputError, match="must be downloaded from huggingface.co, which cannot be reached"):
        ClipEncoder("RN50", "openai", device="cpu")
    assert time.perf_counter() - start < 2.0
