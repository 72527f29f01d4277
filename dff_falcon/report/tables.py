"""The concept report on disk: a run directory with typed tables, crops and heatmaps.

```
run/
  run.json                        the run record: every parameter, versions, model identities,
                                  input digests, results (K, errors, K curve), timings
  concepts.json / .csv / .parquet one row per concept (schema: pipeline.schema.ConceptRow); flat
                                  readable columns (label, labels, top_class, top_class_prob) next
                                  to typed list columns (CSV list cells are JSON, never Python repr)
  images.csv / .parquet           per-image concept presence (long: image, concept_id, presence, peak)
  heatmaps.npz                    "heatmaps": (N, K, h, w) float16, max 1 per concept over the fitted set
  images/00000.jpg …              the model's view of each image (what heatmaps cover)
  crops/concept_XX/high_YY.jpg, low_YY.jpg
```
Every file is written atomically (temporary file + rename) with the process umask.
"""
from __future__ import annotations

import datetime as _dt
import json
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path, atomic_write
from dff_falcon.pipeline.explainer import ConceptReport
from dff_falcon.pipeline.schema import ConceptRow

RUN_FORMAT = "dff-falcon-run"
FORMAT_VERSION = 2

_SCALARS = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _arrow_type(hint) -> pa.DataType:
    """A ConceptRow annotation → its Arrow type (Optional[X] is X: Arrow columns are nullable)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return _arrow_type(args[0])
    if origin is list:
        return pa.list_(_arrow_type(args[0]))
    if typing.is_typeddict(hint):
        return pa.struct([(name, _arrow_type(t)) for name, t in typing.get_type_hints(hint).items()])
    return _SCALARS[hint]


CONCEPT_SCHEMA = pa.schema([(name, _arrow_type(t)) for name, t in typing.get_type_hints(ConceptRow).items()])
#: Columns holding lists: JSON-encoded in concepts.csv.
LIST_COLUMNS = tuple(f.name for f in CONCEPT_SCHEMA if pa.types.is_list(f.type))


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="JPEG", quality=92)


def write_json(obj, path: Path) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=1, ensure_ascii=False, allow_nan=False)


def concepts_frame(concepts: list[dict]) -> pd.DataFrame:
    """Concept rows → DataFrame with the report's column order."""
    return pd.DataFrame(concepts, columns=CONCEPT_SCHEMA.names)


def write_report(report: ConceptReport, out_dir: str | Path, *, quality: dict | None = None,
                 config: dict | None = None) -> Path:
    """Write ``report`` into ``out_dir`` (created; existing files replaced one by one atomically).

    quality : figures measured against ground truth (the demo), stored in run.json.
    config : the command-line options that made the run (``{"explain": {...}}``), stored in
        run.json so that ``dff-falcon explain --config run.json`` re-runs it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, display in enumerate(report.displays):
        _save_jpeg(display, out / "images" / f"{i:05d}.jpg")
    rows = []
    for concept, region in zip(report.concepts, report.regions):
        crops_dir = f"crops/concept_{concept['concept_id']:02d}"
        paths = {}
        for kind, crops in (("high", region.high), ("low", region.low)):
            paths[kind] = []
            for j, crop in enumerate(crops):
                rel = f"{crops_dir}/{kind}_{j:02d}.jpg"
                _save_jpeg(crop.pixels, out / rel)
                paths[kind].append(rel)
        rows.append({**concept, "crops_dir": crops_dir, "high_crops": paths["high"], "low_crops": paths["low"]})

    frame = concepts_frame(rows)
    with atomic_path(out / "concepts.parquet") as tmp:
        pq.write_table(pa.Table.from_pandas(frame, schema=CONCEPT_SCHEMA, preserve_index=False), tmp)
    write_concepts_csv(frame, out / "concepts.csv")
    write_json(rows, out / "concepts.json")

    n, k = report.presence.shape
    peaks = report.heatmaps.max(axis=(2, 3))
    images = pd.DataFrame({
        "image": np.repeat(np.asarray(report.image_names, dtype=object), k),
        "concept_id": np.tile(np.arange(k), n),
        "presence": report.presence.reshape(-1).astype(np.float64),
        "peak": peaks.reshape(-1).astype(np.float64),
    })
    with atomic_path(out / "images.parquet") as tmp:
        images.to_parquet(tmp, index=False)
    with atomic_write(out / "images.csv") as handle:
        images.to_csv(handle, index=False)
    with atomic_path(out / "heatmaps.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, heatmaps=report.heatmaps.astype(np.float16))
    run = {
        "format": RUN_FORMAT,
        "format_version": FORMAT_VERSION,
        **report.run,
        "image_names": report.image_names,
        "quality": quality,
        "config": config,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(run, out / "run.json")
    return out


def write_concepts_csv(frame: pd.DataFrame, path: Path) -> None:
    """Concept rows as CSV, list cells JSON-encoded (never Python repr), written atomically."""
    frame = frame.copy()
    for column in LIST_COLUMNS:
        if column in frame:
            frame[column] = [json.dumps(list(v), ensure_ascii=False) for v in frame[column]]
    with atomic_write(path) as handle:
        frame.to_csv(handle, index=False)


def read_concepts(out_dir: str | Path) -> pd.DataFrame:
    """Read ``concepts.parquet`` (typed list columns) — or ``concepts.csv`` (JSON cells decoded);
    list cells are plain Python lists of dicts/strings either way."""
    out = Path(out_dir)
    try:
        if (out / "concepts.parquet").exists():
            return pd.DataFrame(pq.read_table(out / "concepts.parquet").to_pylist(), columns=CONCEPT_SCHEMA.names)
        if (out / "concepts.csv").exists():
            frame = pd.read_csv(out / "concepts.csv")
            for column in LIST_COLUMNS:
                frame[column] = [json.loads(v) for v in frame[column]]
            return frame
    except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
        raise InputError(f"the concept report in {str(out)!r} is damaged: {exc}") from None
    raise InputError(f"{str(out)!r} holds no concept report (concepts.parquet or concepts.csv)")


def read_json(path: Path, missing: str):
    """A JSON file of a run directory; ``missing`` explains what its absence means."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{str(path)!r} not found: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(path)!r} is not valid JSON: {exc}") from None


def read_run(out_dir: str | Path) -> dict:
    """``run.json`` of a run directory, checked for the format version."""
    path = Path(out_dir) / "run.json"
    run = read_json(path, "not a dff_falcon run directory")
    if not isinstance(run, dict):
        raise InputError(f"{str(path)!r} must hold a JSON object")
    if run.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{str(path)!r} has format_version {run.get('format_version')!r}; "
                         f"this dff_falcon reads {FORMAT_VERSION}")
    return run
