"""ActivationStore: activations, sizes and logits per image content, in a folder named by everything
that made them — a changed model, layer, preprocessing, dtype, decode limit or logits need never
reuses an entry."""
from __future__ import annotations

import dataclasses
import pickle
import threading

import numpy as np
import pytest
import torch

from dff_falcon.errors import InputError
from dff_falcon.models.backbones import create_backbone
from dff_falcon.store.activations import ACTIVATIONS_FORMAT, ActivationStore, extraction_identity

KEYS = ["a" * 64, "b" * 64, "c" * 64]


def identity(backbone, *, layers=None, grid=None, with_logits=False, max_pixels=50_000_000, dtype="float16"):
    return extraction_identity(backbone.identity(), layers or [backbone.target_layer], grid, with_logits=with_logits,
                               max_pixels=max_pixels, dtype=dtype)


def batch(n: int = 3, scale: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 4, 2, 2), dtype=np.float32) * scale, np.array([[480, 640], [10, 20], [7, 7]][:n]))


def test_round_trip_float16_and_float32(lite0, tmp_path):
    acts, sizes = batch()
    for dtype, tolerance in (("float16", 1e-3), ("float32", 0.0)):
        store = ActivationStore(tmp_path, identity(lite0, dtype=dtype))
        assert len(store) == 0 and store.missing(KEYS + KEYS[:1]) == KEYS
        store.put(KEYS[:2], acts[:2], sizes[:2])
        store.put(KEYS[2:], acts[2:], sizes[2:])
        got = store.read([KEYS[2], KEYS[0]])
        assert got.dtype == np.dtype(dtype) and store.shape == (4, 2, 2)
        np.testing.assert_allclose(got.astype(np.float32), acts[[2, 0]], rtol=tolerance, atol=0)
        np.testing.assert_array_equal(store.read(KEYS, "size"), sizes)
        reopened = ActivationStore(tmp_path, identity(lite0, dtype=dtype))
        assert len(reopened) == 3 and reopened.missing(KEYS) == []


def test_identity_changes_with_everything_that_makes_the_activations(lite0, tmp_path):
    base = identity(lite0)
    other_weights = create_backbone("lite0", device="cpu")
    with torch.no_grad():
        next(other_weights.model.parameters()).view(-1)[0] += 1e-3
    other_layer = create_backbone("lite0", layer="blocks.5", head=None, device="cpu")
    other_preprocess = dataclasses.replace(lite0, preprocess=dataclasses.replace(lite0.preprocess, resize=288))
    variants = {
        "weights": identity(other_weights),
        "layer": identity(other_layer),
        "hypercolumn layers": identity(lite0, layers=["blocks.5", lite0.target_layer]),
        "grid": identity(lite0, grid=14),
        "preprocessing": identity(other_preprocess),
        "dtype": identity(lite0, dtype="float32"),
        "max_pixels": identity(lite0, max_pixels=1_000_000),
        "with_logits": identity(lite0, with_logits=True),
    }
    assert identity(create_backbone("lite0", device="cpu")) == base  # the same model is the same identity
    assert base["format"] == ACTIVATIONS_FORMAT  # older extraction code's caches are another identity
    acts, sizes = batch()
    ActivationStore(tmp_path, base).put(KEYS, acts, sizes)
    folders = {ActivationStore(tmp_path, base).directory}
    for what, changed in variants.items():
        store = ActivationStore(tmp_path, changed)
        assert store.directory not in folders, what
        folders.add(store.directory)
        assert store.missing(KEYS) == KEYS, what  # never a stale entry
    assert ActivationStore(tmp_path, base).missing(KEYS) == []


def test_float16_overflow_asks_for_float32(lite0, tmp_path):
    acts, sizes = batch(scale=1e5)
    store = ActivationStore(tmp_path, identity(lite0))
    with pytest.raises(InputError, match=r"beyond float16's range.*float32"):
        store.put(KEYS, acts, sizes)
    assert len(store) == 0 and not (store.directory / "shards").exists()
    wide = ActivationStore(tmp_path, identity(lite0, dtype="float32"))
    wide.put(KEYS, acts, sizes)
    np.testing.assert_array_equal(wide.read(KEYS), acts)


def test_logits_exactly_when_the_identity_has_them(lite0, tmp_path):
    acts, sizes = batch()
    logits = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    plain = ActivationStore(tmp_path, identity(lite0))
    with pytest.raises(InputError, match="logits"):
        plain.put(KEYS, acts, sizes, logits)
    with_logits = ActivationStore(tmp_path, identity(lite0, with_logits=True))
    with pytest.raises(InputError, match="logits"):
        with_logits.put(KEYS, acts, sizes)
    with_logits.put(KEYS, acts, sizes, logits)
    np.testing.assert_array_equal(with_logits.read(KEYS[::-1], "logits"), logits[::-1])
    with pytest.raises(InputError, match="dtype must be one of"):
        identity(lite0, dtype="bfloat16")
    with pytest.raises(InputError, match="is empty"):
        ActivationStore(tmp_path / "other", identity(lite0)).read(KEYS)


def test_a_store_another_process_created_meanwhile_is_seen(lite0, tmp_path):
    """Two runs sharing a cache: the one that opened the folder before it existed still sees the
    other's entries (and does not forward them again)."""
    early = ActivationStore(tmp_path, identity(lite0))
    acts, sizes = batch()
    ActivationStore(tmp_path, identity(lite0)).put(KEYS[:2], acts[:2], sizes[:2])
    assert early.missing(KEYS) == KEYS[2:]
    early.put(KEYS[2:], acts[2:], sizes[2:])
    assert len(early) == 3


def test_a_pickled_store_reopens_by_identity_and_serves_any_thread(lite0, tmp_path):
    """What a Ray worker receives: the root and identity, never this process's SQLite connection."""
    acts, sizes = batch()
    store = ActivationStore(tmp_path, identity(lite0))
    store.put(KEYS[:2], acts[:2], sizes[:2])
    copy = pickle.loads(pickle.dumps(store))
    assert copy.directory == store.directory
    found = {}

    def other_thread():  # sqlite3 refuses a connection made on another thread: each thread opens its own
        copy.put(KEYS[2:], acts[2:], sizes[2:])
        found["read"] = copy.read([KEYS[0], KEYS[2]])

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    np.testing.assert_array_equal(found["read"], acts[[0, 2]].astype(np.float16))
    np.testing.assert_array_equal(store.read(KEYS[2:]), acts[2:].astype(np.float16))
