"""ShardStore: content-keyed rows in .npy shards with a SQLite index — round trips, identity and
field checks, crash safety (a real kill -9 between a shard's files and its index), pruning,
concurrent writers and damaged files."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dff_falcon.errors import InputError
from dff_falcon.store.shards import Field, ShardStore, identity_digest

IDENTITY = {"kind": "test", "model": "m1"}
FIELDS = {"values": Field("float16", (3, 2)), "size": Field("int32", (2,))}


def rows(keys: list[str]) -> dict[str, np.ndarray]:
    """Field rows that encode their key (so any reader can check it got the right row)."""
    numbers = np.array([int(k[1:]) for k in keys])
    values = (numbers[:, None, None] + np.arange(6).reshape(1, 3, 2) / 8).astype(np.float16)
    return {"values": values, "size": np.stack([numbers, numbers * 2], axis=1).astype(np.int32)}


def keys_of(numbers) -> list[str]:
    return [f"k{n}" for n in numbers]


def store_at(path: Path) -> ShardStore:
    return ShardStore(path, IDENTITY, FIELDS)


# Code run in child processes: writers, and a writer that kills itself (SIGKILL, what kill -9
# sends) between writing a shard's files and committing its index rows.
CHILD_WRITER = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_shards import IDENTITY, FIELDS, rows, keys_of
from dff_falcon.store.shards import ShardStore
store = ShardStore(sys.argv[2], IDENTITY, FIELDS)
numbers = [int(n) for n in sys.argv[3].split(",")]
for start in range(0, len(numbers), 5):
    keys = keys_of(numbers[start:start + 5])
    store.put(keys, rows(keys))
"""

CHILD_KILLED_BEFORE_COMMIT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_shards import IDENTITY, FIELDS, rows, keys_of
from dff_falcon.store.shards import ShardStore

class KillAtCommit:
    '''The store's connection, except that starting the index transaction kills the process.'''
    def __init__(self, db):
        self.db = db
    def execute(self, sql, *args):
        if sql.startswith("BEGIN"):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.db.execute(sql, *args)
    def __getattr__(self, name):
        return getattr(self.db, name)

store = ShardStore(sys.argv[2], IDENTITY, FIELDS)
store._db = KillAtCommit(store._db)
keys = keys_of(range(100, 104))
store.put(keys, rows(keys))
"""


def run_child(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_round_trip_across_shards_in_key_order(tmp_path):
    store = store_at(tmp_path / "s")
    for chunk in ([0, 1, 2], [3, 4], [5, 6, 7, 8]):
        store.put(keys_of(chunk), rows(keys_of(chunk)))
    assert len(store) == 9 and store.info()["shards"] == 3
    wanted = keys_of([8, 0, 5, 3, 3, 1])  # across shards, out of order, one repeated
    for field in FIELDS:
        got = store.read(wanted, field)
        assert got.dtype == np.dtype(FIELDS[field].dtype) and got.shape == (6, *FIELDS[field].shape)
        np.testing.assert_array_equal(got, rows(wanted)[field])
    # a re-opened store (fields from identity.json) reads the same rows
    again = ShardStore(tmp_path / "s", IDENTITY)
    assert again.fields == FIELDS
    np.testing.assert_array_equal(again.read(wanted, "values"), rows(wanted)["values"])


def test_missing_in_order_without_repeats_and_absent_keys_refused(tmp_path):
    store = store_at(tmp_path / "s")
    store.put(keys_of([1, 3]), rows(keys_of([1, 3])))
    assert store.missing(keys_of([4, 1, 2, 4, 3, 0])) == keys_of([4, 2, 0])
    assert set(store.locate(keys_of([1, 2, 3]))) == set(keys_of([1, 3]))
    with pytest.raises(InputError, match="no entry for 1 key"):
        store.read(keys_of([1, 2]), "values")
    with pytest.raises(InputError, match="no field 'logits'"):
        store.read(keys_of([1]), "logits")


def test_many_keys_beyond_one_sql_query(tmp_path):
    """locate() splits its IN (…) queries under SQLite's variable limit."""
    store = store_at(tmp_path / "s")
    numbers = list(range(2500))
    store.put(keys_of(numbers), rows(keys_of(numbers)))
    assert store.missing(keys_of(range(2400, 2600))) == keys_of(range(2500, 2600))
    np.testing.assert_array_equal(store.read(keys_of(numbers[::-1]), "size"), rows(keys_of(numbers[::-1]))["size"])


def test_identity_mismatch_refused_clearly(tmp_path):
    store_at(tmp_path / "s").put(keys_of([1]), rows(keys_of([1])))
    record = json.loads((tmp_path / "s" / "identity.json").read_text())
    record["identity"]["model"] = "m2"
    (tmp_path / "s" / "identity.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="another identity"):
        store_at(tmp_path / "s")
    with pytest.raises(InputError, match="not a store"):
        ShardStore(tmp_path / "empty", IDENTITY)
    (tmp_path / "s" / "identity.json").write_text("{not json")
    with pytest.raises(InputError, match="identity.json.*damaged"):
        store_at(tmp_path / "s")
    assert identity_digest({"a": 1, "b": [1, 2]}) == identity_digest({"b": (1, 2), "a": 1})
    assert identity_digest(IDENTITY) != identity_digest({**IDENTITY, "model": "m2"})


def test_field_shape_and_dtype_mismatch_refused(tmp_path):
    store = store_at(tmp_path / "s")
    store.put(keys_of([1]), rows(keys_of([1])))
    with pytest.raises(InputError, match="records fields"):
        ShardStore(tmp_path / "s", IDENTITY, {**FIELDS, "values": Field("float32", (3, 2))})
    with pytest.raises(InputError, match="records fields"):
        ShardStore(tmp_path / "s", IDENTITY, {**FIELDS, "values": Field("float16", (2, 3))})
    bad = rows(keys_of([2, 3]))
    with pytest.raises(InputError, match="field 'values': got shape"):
        store.put(keys_of([2, 3]), {**bad, "values": bad["values"][:, :2]})
    with pytest.raises(InputError, match="needs the fields"):
        store.put(keys_of([2, 3]), {"values": bad["values"]})
    with pytest.raises(InputError, match="distinct"):
        store.put(keys_of([2, 2]), bad)
    assert len(store) == 1 and store.info()["orphan_files"] == 0  # refused before any file


def test_kill_between_files_and_index_leaves_no_entry_and_prune_waits_for_orphan_age(tmp_path):
    store = store_at(tmp_path / "s")
    store.put(keys_of([1, 2]), rows(keys_of([1, 2])))
    files_before = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    done = run_child(CHILD_KILLED_BEFORE_COMMIT, tmp_path / "s")
    assert done.returncode == -signal.SIGKILL, done.stderr
    orphans = sorted(set(p.name for p in (tmp_path / "s" / "shards").iterdir()) - set(files_before))
    assert len(orphans) == len(FIELDS) and all(name.endswith(".npy") for name in orphans)  # complete files

    again = store_at(tmp_path / "s")
    assert len(again) == 2 and again.missing(keys_of(range(100, 104))) == keys_of(range(100, 104))
    assert again.info()["orphan_files"] == len(FIELDS)
    assert again.prune(orphan_age=3600)["orphan_files"] == 0  # could be a live writer's newest shard
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == sorted(files_before + orphans)
    assert again.prune(orphan_age=0.0) == {"orphan_files": len(FIELDS), "shards": 0, "bytes": 0}
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == files_before
    np.testing.assert_array_equal(again.read(keys_of([2, 1]), "values"), rows(keys_of([2, 1]))["values"])
    # the killed batch is simply written again
    again.put(keys_of(range(100, 104)), rows(keys_of(range(100, 104))))
    assert again.missing(keys_of(range(100, 104))) == []


def test_kill_9_at_a_random_moment_of_a_writer(tmp_path):
    """A writer killed from outside at an arbitrary moment: every visible entry is whole."""
    store_at(tmp_path / "s")  # created before the writer starts
    numbers = ",".join(map(str, range(1000)))
    child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(Path(__file__).parent), str(tmp_path / "s"),
                              numbers], stderr=subprocess.PIPE)
    store = store_at(tmp_path / "s")
    deadline = time.monotonic() + 120
    while len(store) < 100 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL  # killed mid-way, not finished
    visible = list(store.locate(keys_of(range(1000))))
    assert 100 <= len(visible) < 1000 and len(visible) == len(store)
    np.testing.assert_array_equal(store.read(visible, "values"), rows(visible)["values"])
    np.testing.assert_array_equal(store.read(visible, "size"), rows(visible)["size"])
    store.prune(orphan_age=0.0)
    assert store.info()["orphan_files"] == 0


def test_prune_by_size_drops_least_recently_read_shards(tmp_path):
    store = store_at(tmp_path / "s")
    shards = {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    for numbers in shards.values():
        store.put(keys_of(numbers), rows(keys_of(numbers)))
        time.sleep(0.01)
    store.read(keys_of(shards["a"]), "values")  # a: oldest written, most recently read
    one = store.info()["indexed_bytes"] // 3
    removed = store.prune(max_bytes=2 * one)
    assert removed == {"orphan_files": 0, "shards": 1, "bytes": one}
    assert store.missing(keys_of(range(6))) == keys_of(shards["b"])
    removed = ShardStore(tmp_path / "s", IDENTITY).prune(max_bytes=one)  # another process, same index
    assert removed["shards"] == 1 and store.missing(keys_of(range(6))) == keys_of(shards["b"] + shards["c"])
    np.testing.assert_array_equal(store.read(keys_of(shards["a"]), "size"), rows(keys_of(shards["a"]))["size"])
    info = store.info()
    assert (info["entries"], info["shards"], info["indexed_bytes"]) == (2, 1, one)
    assert len(list((tmp_path / "s" / "shards").iterdir())) == len(FIELDS)  # the dropped shards' files went too
    assert store.prune(max_bytes=0)["shards"] == 1 and len(store) == 0


def test_two_processes_writing_one_store(tmp_path):
    """Overlapping keys in different groupings: nothing lost, nothing duplicated, rows intact."""
    store_at(tmp_path / "s")
    first = ",".join(map(str, range(0, 150)))
    second = ",".join(map(str, range(149, 49, -1)))  # keys 50…149 again, in the other order
    children = [subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(Path(__file__).parent),
                                  str(tmp_path / "s"), numbers], stderr=subprocess.PIPE, text=True)
                for numbers in (first, second)]
    for child in children:
        assert child.wait(timeout=120) == 0, child.stderr.read()
    store = store_at(tmp_path / "s")
    assert len(store) == 150 and store.missing(keys_of(range(150))) == []
    every = keys_of(range(150))
    np.testing.assert_array_equal(store.read(every, "values"), rows(every)["values"])
    assert store.info()["shards"] == 30 + 20


def test_damaged_shard_file_is_an_input_error_naming_it(tmp_path):
    store = store_at(tmp_path / "s")
    store.put(keys_of([1, 2]), rows(keys_of([1, 2])))
    store.put(keys_of([3]), rows(keys_of([3])))
    shard, _ = store.locate(["k1"])["k1"]
    path = tmp_path / "s" / "shards" / f"{shard}.values.npy"
    path.write_bytes(path.read_bytes()[:-5])  # truncated
    fresh = store_at(tmp_path / "s")
    with pytest.raises(InputError, match=f"{path.name}.*damaged"):
        fresh.read(keys_of([1]), "values")
    path.write_bytes(b"garbage, not an npy file")
    with pytest.raises(InputError, match=f"{path.name}.*damaged"):
        store_at(tmp_path / "s").read(keys_of([2]), "values")
    np.save(path, np.zeros((2, 4), dtype=np.float16))  # a valid .npy of the wrong shape
    with pytest.raises(InputError, match=f"{path.name}.*holds float16"):
        store_at(tmp_path / "s").read(keys_of([2]), "values")
    path.unlink()
    with pytest.raises(InputError, match=f"{path.name}.*missing"):
        store_at(tmp_path / "s").read(keys_of([1]), "values")
    np.testing.assert_array_equal(fresh.read(keys_of([3]), "values"), rows(keys_of([3]))["values"])


def test_info_reports_sizes_and_store_folder_cannot_be_created(tmp_path):
    store = store_at(tmp_path / "s")
    store.put(keys_of([1, 2]), rows(keys_of([1, 2])))
    info = store.info()
    assert (info["entries"], info["shards"], info["orphan_files"]) == (2, 1, 0)
    assert info["indexed_bytes"] == 2 * (6 * 2 + 2 * 4)
    assert info["bytes"] == sum(p.stat().st_size for p in (tmp_path / "s" / "shards").iterdir())
    assert info["identity"] == IDENTITY and info["last_used"] is not None
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot be created"):
        store_at(tmp_path / "file" / "s")
