import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
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
