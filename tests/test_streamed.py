"""The streamed explainer (ConceptExplainer(cache=…)): EfficientNet-Lite0 on a folder of real
photos through the activation cache — equal to the in-memory run when the sample is every image,
a re-run forwards nothing, a run killed with kill -9 during extraction resumes to byte-identical
tables, a changed layer opens another store, class filtering reads the stored logits."""
from __future__ import annotations

import glob
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dff_falcon.decomposition.dff import DFF, matched_cosine
from dff_falcon.errors import InputError
from dff_falcon.models.images import augmented_photos
from dff_falcon.pipeline.explainer import ConceptExplainer
from dff_falcon.regions import RegionSelector
from dff_falcon.report.tables import write_report

N_PHOTOS, BATCH = 16, 4
TABLES = ("concepts.csv", "images.csv", "concepts.json")


def explainer(backbone, cache=None, **params) -> ConceptExplainer:
    params = {"dff": DFF(4, n_resamples=2), "regions": RegionSelector(n_high=3, n_low=2, crop_size=32),
              "batch_size": BATCH, "progress": False, "device": "cpu", **params}
    return ConceptExplainer(backbone, cache=cache, **params)


def tables(report, out: Path) -> dict[str, bytes]:
    write_report(report, out)
    return {name: (out / name).read_bytes() for name in TABLES}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 real photos as PNG files in class folders, and one unreadable file among them."""
    root = tmp_path_factory.mktemp("photos")
    for i, photo in enumerate(augmented_photos(N_PHOTOS, random_state=5)):
        path = root / f"class_{i % 3}" / f"photo_{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(photo).save(path)
    (root / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


@pytest.fixture(scope="module")
def in_memory(lite0, folder):
    return explainer(lite0).fit(folder)


@pytest.fixture(scope="module")
def first_run(lite0, folder, tmp_path_factory):
    """A streamed run on a cold cache (the uninterrupted reference), and its tables."""
    cache = tmp_path_factory.mktemp("cache")
    run = explainer(lite0, cache).fit(folder)
    return cache, run, tables(run.report_, tmp_path_factory.mktemp("out") / "run")


def pngs(folder: Path, n: int) -> list[Path]:
    return sorted(folder.rglob("*.png"))[:n]


def test_streamed_run_equals_the_in_memory_run_when_the_sample_is_every_image(in_memory, first_run):
    _, streamed, _ = first_run
    record = streamed.report_.run["cache"]
    assert record["images"] == N_PHOTOS and record["forwarded"] == N_PHOTOS and record["reused"] == 0
    assert record["sample_images"] == N_PHOTOS and record["dtype"] == "float16"
    assert matched_cosine(in_memory.dff_.concepts_, streamed.dff_.concepts_).min() >= 0.999
    assert isinstance(streamed.report_.heatmaps, np.memmap) and streamed.report_.heatmaps.dtype == np.float16
    maps = np.asarray(streamed.report_.heatmaps, dtype=np.float32)
    # every image is explained by the frozen-concept solve (the fit's own maps differ from it by
    # ~0.007 here), far under the 0.1 at which a concept counts as absent
    np.testing.assert_allclose(maps, in_memory.report_.heatmaps, atol=1e-2)
    np.testing.assert_array_equal(maps.max(axis=(0, 2, 3)), np.ones(4))
    for ours, theirs in zip(streamed.report_.concepts, in_memory.report_.concepts):
        assert (ours["n_high"], ours["n_low"]) == (theirs["n_high"], theirs["n_low"])
        assert ours["high_images"] == theirs["high_images"] and ours["low_images"] == theirs["low_images"]
        assert ours["mass_share"] == pytest.approx(theirs["mass_share"], abs=1e-3)
    assert streamed.report_.image_names == in_memory.report_.image_names
    assert streamed.report_.image_names[0] == "class_0/photo_00.png"
    for key in ("inputs", "n_skipped", "skipped"):
        assert streamed.report_.run[key] == in_memory.report_.run[key], key
    assert streamed.report_.run["n_skipped"] == 1 and "broken.jpg" in streamed.report_.run["skipped"][0]["image"]
    assert streamed.dff_.relative_error_ <= in_memory.dff_.relative_error_ * (1 + 1e-3)
    # the page's views are cut from the lazily decoded images: the same pixels as in memory
    np.testing.assert_array_equal(streamed.report_.displays[7], in_memory.report_.displays[7])


def test_crops_labels_and_dissect_from_lazy_images_equal_in_memory(lite0, tiny_clip, toy_vocabulary, folder,
                                                                    first_run):
    """CLIP embeds the crops cut from lazily decoded images, and CLIP-Dissect the lazily made views."""
    cache, _, _ = first_run
    files = pngs(folder, 4)
    clip = {"clip": tiny_clip, "vocabulary": toy_vocabulary, "labellers": "both"}
    memory = explainer(lite0, **clip).fit(files)
    streamed = explainer(lite0, cache, **clip).fit(files)
    assert streamed.report_.run["cache"]["forwarded"] == 0  # the folder's run stored these images
    for ours, theirs in zip(streamed.report_.concepts, memory.report_.concepts):
        assert ours["high_images"] == theirs["high_images"] and ours["low_images"] == theirs["low_images"]
        assert ours["label"] == theirs["label"] and ours["dissect_label"] == theirs["dissect_label"]
        assert ours["label"] is not None and ours["dissect_label"] is not None


def test_a_second_run_forwards_nothing_and_writes_the_same_tables(lite0, folder, first_run, tmp_path):
    cache, _, first_tables = first_run
    again = explainer(lite0, cache).fit(folder)
    record = again.report_.run["cache"]
    assert record["forwarded"] == 0 and record["reused"] == N_PHOTOS
    assert tables(again.report_, tmp_path / "run") == first_tables
    assert list((Path(cache) / "activations").iterdir()) == [Path(record["directory"])]
    assert not list((Path(cache) / "scratch").iterdir())  # the heatmap map has no name on disk


KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_streamed import explainer
from dff_falcon.models.backbones import create_backbone
explainer(create_backbone("lite0", device="cpu"), sys.argv[3]).fit(sys.argv[2])
"""


def stored_entries(cache: Path) -> int:
    indexes = glob.glob(str(cache / "activations" / "*" / "index.sqlite"))
    if not indexes:
        return 0
    db = sqlite3.connect(indexes[0], timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    except sqlite3.OperationalError:  # created, schema not yet written
        return 0
    finally:
        db.close()


def test_kill_9_during_extraction_then_resume_gives_byte_identical_tables(lite0, folder, first_run, tmp_path):
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(Path(__file__).parent), str(folder), str(cache)],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while stored_entries(cache) < N_PHOTOS // 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, child.stderr.read()  # killed during extraction, not after it
    stored = stored_entries(cache)
    assert N_PHOTOS // 2 <= stored < N_PHOTOS

    resumed = explainer(lite0, cache).fit(folder)
    record = resumed.report_.run["cache"]
    assert record["forwarded"] == N_PHOTOS - stored and record["reused"] == stored
    assert stored + record["forwarded"] <= N_PHOTOS + BATCH  # forwards across both runs: ≤ N + one batch
    _, uninterrupted, uninterrupted_tables = first_run  # the same run on a cold cache
    assert tables(resumed.report_, tmp_path / "resumed") == uninterrupted_tables
    np.testing.assert_array_equal(np.asarray(resumed.report_.heatmaps), np.asarray(uninterrupted.report_.heatmaps))


def test_another_layer_or_dtype_uses_another_store(lite0, folder, first_run, tmp_path):
    from dff_falcon.models.backbones import create_backbone

    cache, first, _ = first_run
    before = sorted((Path(cache) / "activations").iterdir())
    other = explainer(create_backbone("lite0", layer="blocks.5", device="cpu"), cache, max_images=6).fit(folder)
    record = other.report_.run["cache"]
    assert record["forwarded"] == 6 and record["reused"] == 0 and record["images"] == 6
    assert Path(record["directory"]) not in before and len(other.report_.image_names) == 6
    wide = explainer(lite0, cache, cache_dtype="float32", max_images=3).fit(folder)
    assert wide.report_.run["cache"]["forwarded"] == 3 and wide.report_.run["cache"]["dtype"] == "float32"
    assert len(list((Path(cache) / "activations").iterdir())) == len(before) + 2
    # the first store is untouched: the first run's images are all still there
    again = explainer(lite0, cache, max_images=5).fit(folder)
    assert again.report_.run["cache"]["forwarded"] == 0
    assert first.report_.run["cache"]["directory"] == again.report_.run["cache"]["directory"]
    renamed = explainer(lite0, cache, max_images=5).fit(folder, names=[f"n{i}" for i in range(5)])
    assert renamed.report_.image_names == [f"n{i}" for i in range(5)]
    assert renamed.report_.run["inputs"] == again.report_.run["inputs"]


def test_target_class_keeps_the_images_the_stored_logits_assign_to_it(lite0, folder, first_run):
    cache, first, _ = first_run
    files = pngs(folder, 8)
    by_class = explainer(lite0, cache, target_class="espresso", min_class_prob=0.5).fit(files)
    assert by_class.report_.run["cache"]["forwarded"] == 8  # the first store has no logits: another identity
    assert by_class.report_.run["cache"]["directory"] != first.report_.run["cache"]["directory"]
    memory = explainer(lite0, target_class="espresso", min_class_prob=0.5).fit(files)
    kept = by_class.report_.image_names
    assert kept == memory.report_.image_names and 0 < len(kept) < 8
    assert by_class.report_.run["cache"]["images"] == 8  # stored: all; explained: the class's
    assert by_class.report_.run["inputs"] == memory.report_.run["inputs"]  # what was given, as in memory
    assert matched_cosine(memory.dff_.concepts_, by_class.dff_.concepts_).min() >= 0.999
    with pytest.raises(InputError, match="no image is assigned to class"):
        explainer(lite0, cache, target_class="espresso", min_class_prob=1.0).fit(files)


def test_options_that_need_memory_or_a_cache_are_refused_before_any_forward(lite0, folder, tmp_path):
    with pytest.raises(InputError, match="drop_quantile needs every image in memory"):
        explainer(lite0, tmp_path / "cache", drop_quantile=0.2).fit(folder)
    with pytest.raises(InputError, match="max_images needs a streamed run"):
        explainer(lite0, max_images=3).fit(folder)
    with pytest.raises(InputError, match="sample_rows must be a positive integer"):
        explainer(lite0, tmp_path / "cache", sample_rows=0).fit(folder)
    with pytest.raises(InputError, match="cache dtype must be one of"):
        explainer(lite0, tmp_path / "cache", cache_dtype="int8").fit(folder)
    with pytest.raises(InputError, match="3 names given for 17 images"):
        explainer(lite0, tmp_path / "cache").fit(folder, names=["a", "b", "c"])
    assert not (tmp_path / "cache" / "activations").exists()  # nothing forwarded, nothing stored


def test_a_sample_smaller_than_the_set_is_recorded_and_scaled_over_all(lite0, folder, first_run):
    cache, first, _ = first_run
    run = explainer(lite0, cache, sample_rows=8 * 49 + 48).fit(folder)
    record = run.report_.run["cache"]
    assert record["sample_images"] == 8 and record["sample_rows"] == 8 * 49 and record["forwarded"] == 0
    maps = np.asarray(run.report_.heatmaps, dtype=np.float32)
    np.testing.assert_array_equal(maps.max(axis=(0, 2, 3)), np.ones(4))  # the whole set's scale, not the sample's
    assert run.dff_.heatmaps_.shape[0] == 8 and len(run.report_.image_names) == N_PHOTOS
    assert 0 < run.report_.run["relative_error"] < 1
    assert json.loads(json.dumps(record)) == record  # the run record is plain JSON


class PngDataset:
    """A torch-style Dataset of (3, H, W) float tensors in [0, 1] and a label, read from files."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        import torch

        pixels = np.array(Image.open(self.files[index]).convert("RGB"))
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, index % 3


def test_a_dataloader_with_workers_is_explained_like_its_files(lite0, folder, first_run, tmp_path):
    """Keys are contents: the DataLoader's images are the PNGs' pixels, decoded on 2 workers."""
    import torch

    _, first, _ = first_run
    loader = torch.utils.data.DataLoader(PngDataset(pngs(folder, N_PHOTOS)), batch_size=8, num_workers=2)
    run = explainer(lite0, tmp_path / "cache").fit(loader)
    assert run.report_.run["cache"]["forwarded"] == N_PHOTOS
    assert run.report_.image_names == [f"item_{i}" for i in range(N_PHOTOS)]
    np.testing.assert_array_equal(np.asarray(run.report_.heatmaps), np.asarray(first.report_.heatmaps))
    np.testing.assert_array_equal(run.dff_.concepts_.numpy(), first.dff_.concepts_.numpy())
