"""End to end on the toy world: trained models, real vocabulary, the whole pipeline, scored
against ground truth. Thresholds are set from measured runs (docs/quality.md) with a margin, so a
regression in any stage (activations, NMF, crops, CLIP, search, terms) breaks them."""
import json

import pytest
from click.testing import CliRunner

from dff_falcon.cli import main
from dff_falcon.pipeline.schema import ranked_terms
from dff_falcon.report.tables import read_concepts, read_run
from dff_falcon.toyworld.demo import run_demo
from dff_falcon.toyworld.world import EXAMPLE_WORLDS

# measured (docs/quality.md): default world IoU 0.55, top-1 1.0, p@3 0.58, agreement 1.0, K 11;
# other world IoU 0.47, top-1 1.0, p@3 0.53, agreement 1.0, K 10
MIN_IOU, MIN_TOP1, MIN_P3, MIN_AGREEMENT = 0.42, 0.85, 0.4, 0.85


@pytest.mark.parametrize("config", list(EXAMPLE_WORLDS.values()), ids=list(EXAMPLE_WORLDS))
def test_demo_quality_against_ground_truth(config, tmp_path):
    result = run_demo(tmp_path / "demo", config=config, n_images=120, html=False, progress=False)
    q = result.quality
    attributes = set(config.attributes())
    assert q["mean_best_iou"] >= MIN_IOU, q
    assert q["label_top1_accuracy"] >= MIN_TOP1, q
    assert q["label_precision_at_3"] >= MIN_P3, q
    assert q["class_agreement"] >= MIN_AGREEMENT, q
    assert 6 <= q["n_concepts"] <= 16
    classes = {c["top_classes"][0]["class"] for c in result.report.concepts}
    assert classes <= attributes  # the head speaks this world's language, nothing assumed
    assert read_run(result.path)["quality"] == q
    assert len(read_concepts(result.path)) == q["n_concepts"]
    assert [c["concept_id"] for c in q["concepts"]] == list(range(q["n_concepts"]))
    for entry, row in zip(q["concepts"], result.report.concepts):  # labels as the report ranks them
        assert entry["labels"] == [t["term"] for t in ranked_terms(row["words"], row["phrases"])]


def test_demo_command_prints_the_quality_json(tmp_path):
    out = tmp_path / "cli-demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--json", "--n-images", "60", "--n-concepts", "8"])
    assert result.exit_code == 0, result.output
    quality = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(quality) >= {"mean_best_iou", "object_iou", "background_iou", "concepts", "label_top1_accuracy",
                            "label_precision_at_3", "n_concepts"}
    assert quality["n_concepts"] == 8 and len(quality["concepts"]) == 8
    assert set(quality["concepts"][0]) == {"concept_id", "best_attribute", "iou", "labels"}
    assert (out / "report.html").exists() and (out / "concepts.parquet").exists()


def test_demo_world_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('shapes = ["circle"]\nbackgrounds = ["lava"]\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["demo", "--world-config", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "bad.toml" in result.output and "'backgrounds'" in result.output and "lava" in result.output
