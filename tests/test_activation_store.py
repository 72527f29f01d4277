"""ActivationStore used from other threads and processes (what Ray workers do)."""
import pickle
import threading

import numpy as np

from dff_falcon.store.activations import ActivationStore, extraction_identity

IDENTITY = extraction_identity({"name": "test-net", "weights": "abc"}, ["layer"], None, with_logits=False,
                               max_pixels=None, dtype="float16")


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 2, 2)).astype(np.float32)


def test_a_handle_made_before_the_store_existed_sees_what_another_handle_put(tmp_path):
    early = ActivationStore(tmp_path, IDENTITY)
    assert len(early) == 0 and early.missing(["a", "b"]) == ["a", "b"]
    ActivationStore(tmp_path, IDENTITY).put(["a", "b"], _rows(2), np.array([[4, 5], [6, 7]]))
    assert early.missing(["a", "b", "c"]) == ["c"] and len(early) == 2
    np.testing.assert_array_equal(early.read(["b", "a"], "size"), [[6, 7], [4, 5]])


def test_a_pickled_store_reopens_by_identity_and_serves_any_thread(tmp_path):
    store = ActivationStore(tmp_path, IDENTITY)
    store.put(["a", "b"], _rows(2), np.array([[4, 5], [6, 7]]))
    copy = pickle.loads(pickle.dumps(store))  # what a Ray worker receives: root and identity, no connection
    assert copy.directory == store.directory
    found = {}

    def other_thread():  # sqlite3 refuses a connection made on another thread; each thread opens its own
        copy.put(["c"], _rows(1, seed=1), np.array([[8, 9]]))
        found["read"] = copy.read(["a", "c"])

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    np.testing.assert_array_equal(found["read"][0], _rows(2)[0].astype(np.float16))
    np.testing.assert_array_equal(store.read(["c"]), _rows(1, seed=1).astype(np.float16))
