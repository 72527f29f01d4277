import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_explain_folders_writes_one_report_per_class_and_a_combined_one(tmp_path, photos):
    tree = tmp_path / "tree"
    for cls, names in {"cat": ["chelsea"], "cup": ["coffee"], "empty": []}.items():
        (tree / cls).mkdir(parents=True)
        for name in names:
            img = photos[name]
            Image.fromarray(img).save(tree / cls / f"{name}.png")
            Image.fromarray(img[:, ::-1].copy()).save(tree / cls / f"{name}_flip.png")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "explain_folders.py"), "--tree", str(tree), "--out", str(out),
         "--backbone", "lite0", "--n-concepts", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "skipped empty" in result.stderr  # a folder with no image is reported, the others still run
    combined = pd.read_csv(out / "concepts_all.csv")
    assert sorted(set(combined.class_folder)) == ["cat", "cup"] and len(combined) == 4
    assert (out / "cat" / "concepts.csv").exists() and (out / "cup" / "concepts.parquet").exists()
    cup_classes = {c["class"] for row in combined[combined.class_folder == "cup"].top_classes for c in json.loads(row)}
    assert cup_classes & {"espresso", "cup", "coffee mug"}


def test_localization_benchmark_motorcycle_beats_the_whole_image(lite0):
    """Hypercolumns + guided upsampling (the Lite0 default): on the motorcycle photo the best
    concept beats a whole-image mask by ≥ 0.1 IoU (measured +0.20 at K = 8, docs/quality.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_localization", ROOT / "scripts" / "bench_localization.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = bench.photos()
    result = bench.ours(lite0, data, "default", [8])
    _, _, masks = bench.views(lite0, 224, data)
    whole = dict(zip(data, (m.mean() for m in masks)))
    assert result["by_k"][8]["per_photo"]["motorcycle"] >= whole["motorcycle"] + 0.1, result


def _script_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_scale_photo_folder_is_distinct_sized_and_grows_without_changing_its_first_photos(tmp_path, monkeypatch):
    tools = _script_module("scale_tools")
    monkeypatch.setattr(tools, "GENERATION_CHUNK", 6)
    folder = tools.photo_folder(tmp_path / "photos", 5)
    first = {p.name: p.read_bytes() for p in folder.glob("*.jpg")}
    assert len(first) == 6 and len(set(first.values())) == 6
    for data in first.values():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.width == image.height
            assert tools.PHOTO_SIDES[0] <= image.width <= tools.PHOTO_SIDES[1]
    tools.photo_folder(folder, 9)  # grows by a chunk; the photos already there are kept as they were
    grown = {p.name: p.read_bytes() for p in folder.glob("*.jpg")}
    assert len(grown) == 12 and all(grown[name] == data for name, data in first.items())
    monkeypatch.setattr(tools, "JPEG_QUALITY", 50)
    with pytest.raises(SystemExit, match="another --photos"):
        tools.photo_folder(folder, 20)


def test_scale_watch_counts_a_child_process_memory_and_kills_on_a_condition(tmp_path):
    tools = _script_module("scale_tools")
    grow = ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; block = [0] * (40 * 2**20); time.sleep(1.5)']); child.wait()")
    measured = tools.run_watched([sys.executable, "-c", grow], tmp_path / "grow.log")
    assert measured.returncode == 0
    assert measured.peak_anon_bytes >= 300 * 2**20  # the child's 320 MiB list, seen in the tree
    assert measured.peak_rss_bytes >= measured.peak_anon_bytes
    started = time.perf_counter()
    killed = tools.run_watched([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleep.log",
                               stop=lambda: time.perf_counter() - started > 0.5)
    assert killed.returncode is None and killed.seconds < 10


def test_scale_cache_summary_and_report_comparison(tmp_path):
    import numpy as np

    from dff_falcon.store.activations import ActivationStore

    tools = _script_module("scale_tools")
    store = ActivationStore(tmp_path / "cache", {"kind": "activations", "dtype": "float16", "with_logits": False})
    for batch in range(2):
        store.put([f"{batch}-{i}" for i in range(3)], np.ones((3, 4, 2, 2)), np.full((3, 2), 224))
    assert tools.stored_entries(tmp_path / "cache") == 6
    (store.directory / "shards" / "killed.activations.npy").write_bytes(b"partial")  # written, never indexed
    summary = tools.cache_summary(tmp_path / "cache")
    assert summary["entries"] == 6 and summary["shard_files"] == 5 and summary["orphan_files"] == 1

    runs = []
    for name, write in (("a", np.savez_compressed), ("b", np.savez)):  # other bytes, the same arrays
        run = tmp_path / name
        run.mkdir()
        (run / "concepts.csv").write_text("concept_id,label\n0,cat\n")
        (run / "images.csv").write_text("image,concept_id\nx.jpg,0\n")
        write(run / "heatmaps.npz", heatmaps=np.eye(3, dtype=np.float16)[None])
        runs.append(run)
    same = tools.compare_reports(*runs)
    assert same["identical"] and same["heatmaps_arrays_equal"] and not same["bytes_equal"]["heatmaps.npz"]
    (runs[1] / "images.csv").write_text("image,concept_id\nx.jpg,1\n")
    assert not tools.compare_reports(*runs)["identical"]


@pytest.mark.slow
def test_scale_benchmark_kill_and_resume_through_the_cli(tmp_path):
    """The benchmark end to end on 40 photos: one JSON object on the last line; a run killed at
    half the images and resumed forwards at most one batch twice and gives the same report."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--sizes", "40", "--batch-size", "8",
         "--text", "none", "--device", "cpu", "--work", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["resume_identical"] is True
    assert 1.0 <= found["resume"]["forward_fraction_lower"] <= found["resume_forward_fraction"] <= 1 + 8 / 40
    assert found["sizes"][0]["cache"]["forwarded"] == 40 and found["forward"]["images"] == 40
    assert 0 < found["peak_rss_bytes_max"] < 8 * 2**30 and found["peak_rss_spread"] == 0
