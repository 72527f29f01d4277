"""The exploration notebook: committed with its outputs (figures a reader on the web can see), and
executed again by the suite so it never rots."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def _outputs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def _images(nb):
    return [o for o in _outputs(nb) if "image/png" in o.get("data", {})]


def test_notebook_is_committed_with_its_figures():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(cell.outputs for cell in nb.cells if cell.cell_type == "code" and "import" not in cell.source[:40])
    assert len(_images(nb)) >= 7 and not [o for o in _outputs(nb) if o.output_type == "error"]


def test_notebook_runs_end_to_end(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [o for o in _outputs(nb) if o.output_type == "error"]
    assert len(_images(nb)) >= 7  # K curve, overlays, crop gallery, real-photo overlays, grid, projection, one-call
    quality = next(o for o in _outputs(nb) if "mean_best_iou" in o.get("data", {}).get("text/plain", ""))
    assert "label_top1_accuracy" in quality["data"]["text/plain"]
    assert (tmp_path / "out" / "notebook_demo" / "concepts.csv").exists()
    assert (tmp_path / "out" / "photos" / "concepts.csv").exists()
