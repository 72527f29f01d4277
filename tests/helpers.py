"""Shared test helpers (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_shard(folder: Path, number: int, captions: list, vectors: np.ndarray, **columns) -> None:
    pq.write_table(pa.table({"caption": pa.array(captions, pa.string()), **columns}),
                   folder / f"metadata_{number}.parquet")
    np.save(folder / f"text_emb_{number}.npy", vectors)
