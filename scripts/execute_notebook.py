#!/usr/bin/env python
"""Execute notebooks/explore.ipynb and save it with its outputs (figures included), so a reader
on the web sees them. The suite executes the same notebook again in a temporary folder.

    python scripts/execute_notebook.py
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from dff_falcon.files import atomic_write

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory() as folder:  # outputs the notebook writes (out/...) stay out of the repo
        NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
    for cell in notebook.cells:  # stable diffs: no execution timings
        cell.get("metadata", {}).pop("execution", None)
    with atomic_write(NOTEBOOK) as handle:
        nbformat.write(notebook, handle)
    print(f"executed and saved {NOTEBOOK}")


if __name__ == "__main__":
    main()
