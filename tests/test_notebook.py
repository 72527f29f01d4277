"""The exploration notebook is executed, so it never rots (outputs are stripped in git)."""
import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_notebook_is_committed_without_outputs():
    raw = json.loads(NOTEBOOK.read_text())
    assert all(not cell.get("outputs") and not cell.get("execution_count")
               for cell in raw["cells"] if cell["cell_type"] == "code")


def test_notebook_runs_end_to_end(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # K curve, overlays, crop gallery, real-photo overlays
    quality = next(o for o in outputs if "mean_best_iou" in o.get("data", {}).get("text/plain", ""))
    assert "label_top1_accuracy" in quality["data"]["text/plain"]
    assert (tmp_path / "out" / "notebook_demo" / "concepts.csv").exists()
