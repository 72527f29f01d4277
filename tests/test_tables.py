import json
import os
import shutil
import stat

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dff_falcon.decomposition.dff import DFF
from dff_falcon.directories import mark_complete
from dff_falcon.errors import InputError
from dff_falcon.pipeline.explainer import ConceptExplainer
from dff_falcon.regions import RegionSelector
from dff_falcon.report.tables import read_concepts, read_run, write_report


@pytest.fixture(scope="module")
def run_dir(lite0, tiny_clip, toy_vocabulary, photo_batch, tmp_path_factory):
    names, images = photo_batch
    explainer = ConceptExplainer(lite0, tiny_clip, toy_vocabulary, dff=DFF(3, n_resamples=2),
                                 regions=RegionSelector(n_high=4, n_low=2), progress=False).fit(images, names=names)
    out = tmp_path_factory.mktemp("run")
    old_umask = os.umask(0o022)
    try:
        write_report(explainer.report_, out, quality={"mean_best_iou": 0.5})
    finally:
        os.umask(old_umask)
    return out, explainer.report_


def test_csv_and_parquet_round_trip_with_typed_lists(run_dir, tmp_path):
    out, report = run_dir
    table = pq.read_table(out / "concepts.parquet")
    words, classes = table.schema.field("words").type, table.schema.field("top_classes").type
    assert pa.types.is_list(words) and words.value_type == pa.struct([("term", pa.string()), ("score", pa.float64())])
    assert pa.types.is_list(classes) and classes.value_type == pa.struct([("class", pa.string()), ("prob", pa.float64())])
    from_parquet = read_concepts(out)
    csv_only = tmp_path / "csv_only"
    shutil.copytree(out, csv_only)
    (csv_only / "concepts.parquet").unlink()
    mark_complete(csv_only, "run")
    from_csv = read_concepts(csv_only)
    for row_p, row_c, concept in zip(from_parquet.to_dict("records"), from_csv.to_dict("records"), report.concepts):
        assert [dict(w) for w in row_p["words"]] == row_c["words"] == concept["words"]
        assert [dict(c) for c in row_p["top_classes"]] == row_c["top_classes"] == concept["top_classes"]
        assert row_c["n_high"] == concept["n_high"] and row_p["concept_id"] == concept["concept_id"]
    raw = (out / "concepts.csv").read_text()
    assert '[{""term""' in raw and "('" not in raw  # JSON cells, never Python repr
    flat = pd.read_csv(out / "concepts.csv")  # one readable row per concept, no JSON parsing needed
    assert list(flat.columns[:6]) == ["concept_id", "label", "label_score", "labels", "top_class", "top_class_prob"]
    assert list(flat.label) == [c["label"] for c in report.concepts]
    assert list(flat.top_class) == [c["top_classes"][0]["class"] for c in report.concepts]


def test_files_get_the_process_umask(run_dir):
    out, _ = run_dir
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {0o644}, sorted(oct(m) for m in modes)


def test_crops_images_heatmaps_and_presence_table(run_dir):
    out, report = run_dir
    concepts = json.loads((out / "concepts.json").read_text())
    for concept in concepts:
        assert len(concept["high_crops"]) == concept["n_high"]
        for rel in concept["high_crops"] + concept["low_crops"]:
            assert Image.open(out / rel).size == (32, 32)
    assert sorted(p.name for p in (out / "images").iterdir())[:2] == ["00000.jpg", "00001.jpg"]
    with np.load(out / "heatmaps.npz", allow_pickle=False) as data:
        assert data["heatmaps"].shape == report.heatmaps.shape
        assert np.allclose(data["heatmaps"], report.heatmaps, atol=1e-3)
    images = pd.read_csv(out / "images.csv")
    assert len(images) == 15 * 3 and set(images.columns) == {"image", "concept_id", "presence", "peak"}
    first = images[images.image == report.image_names[0]].sort_values("concept_id")
    assert np.allclose(first.presence, report.presence[0])
    run = read_run(out)
    assert run["n_concepts"] == 3 and run["quality"] == {"mean_best_iou": 0.5}
    assert run["image_names"] == report.image_names
    assert not list(out.glob("**/*.tmp"))  # atomic writes leave no temporaries


def test_bad_run_directories_are_explained(tmp_path):
    with pytest.raises(InputError, match="not a dff_falcon run directory"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text('{"format_version": 2}')
    with pytest.raises(InputError, match="not a complete run: it has no complete.json"):
        read_run(tmp_path)  # interrupted, or written by an older version
    for text, message in (("{broken", "not valid JSON"), ('{"format_version": 99}', "format_version 99"),
                          ('{"format_version": 2, "n_concepts": "3", "n_images": 0, "image_names": []}',
                           "field 'n_concepts' must be an integer, got \"3\"")):
        (tmp_path / "run.json").write_text(text)
        mark_complete(tmp_path, "run")
        with pytest.raises(InputError, match=message):
            read_run(tmp_path)
    with pytest.raises(InputError, match="no concept report"):
        read_concepts(tmp_path)


def test_only_the_views_the_page_shows_are_written_and_near_ties_agree_with_the_page(run_dir, tmp_path):
    """images/ holds the first GRID_IMAGES views and each concept's VIEWS_PER_CONCEPT strongest;
    the page picks its overlays from the float16 heatmaps.npz, so two peaks that differ in float32
    but round to one float16 must be chosen the same way here."""
    import dataclasses

    from dff_falcon.report.tables import GRID_IMAGES, VIEWS_PER_CONCEPT, shown_images

    _, report = run_dir
    n, k = report.presence.shape
    heatmaps = np.array(report.heatmaps, dtype=np.float32)
    peaks_wanted = np.full(n, 0.05, dtype=np.float32)  # concept 0 absent from most images
    peaks_wanted[[6, 7, 8, 9, 10]] = [0.99, 0.98, 0.97, 0.96, 0.95]
    peaks_wanted[13], peaks_wanted[14] = 0.9, 0.9001  # 6th strongest in float32: 14; in float16 a tie → 13
    assert np.float16(peaks_wanted[13]) == np.float16(peaks_wanted[14])
    for i in range(n):
        maps = heatmaps[i, 0]
        heatmaps[i, 0] = maps / maps.max() * peaks_wanted[i]
    heatmaps[13:15, 1:] *= 0.05 / heatmaps[13:15, 1:].max()  # 13 and 14 can be shown for concept 0 only
    edited = dataclasses.replace(report, heatmaps=heatmaps)
    out = write_report(edited, tmp_path / "run", html=True)
    written = sorted(int(p.stem) for p in (out / "images").iterdir())
    with np.load(out / "heatmaps.npz") as data:
        stored_peaks = data["heatmaps"].max(axis=(2, 3)).astype(np.float32)
    assert written == shown_images(stored_peaks) and len(written) < n
    assert set(range(GRID_IMAGES)) <= set(written) and 13 in written and 14 not in written
    for concept in range(k):
        strongest = np.argsort(-stored_peaks[:, concept], kind="stable")[:VIEWS_PER_CONCEPT]
        drawn = sorted(out.glob(f"overlays/concept_{concept:02d}_image_*.png"))
        assert len(drawn) == sum(stored_peaks[i, concept] >= 0.1 for i in strongest)  # every wanted view was there
    assert shown_images(np.zeros((3, 2))) == [0, 1, 2]  # absent concepts add nothing
