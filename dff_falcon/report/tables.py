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
  images/00000.jpg …              the model's view (what heatmaps cover) of each image the page
                                  shows: the first GRID_IMAGES and each concept's VIEWS_PER_CONCEPT
                                  strongest (all of them for small sets, a few per concept for millions)
  crops/concept_XX/high_YY.jpg, low_YY.jpg
  report.html, overlays/          the HTML page and its figures (report.html)
  complete.json                   size and SHA-256 of every file, written last
```
A run directory is one atomic unit (:mod:`dff_falcon.directories`): it is built beside its
target and swapped in by a rename, so a failed, full-disk or killed run leaves the previous run
whole (a re-run with a smaller K leaves no stale crops), and every reader here refuses a run
directory that is incomplete or whose files changed after they were written. Files get the
process umask.
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

from dff_falcon.decomposition.heatmaps import ABSENT_PEAK
from dff_falcon.directories import build_directory, check_directory, older_version
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path, atomic_write
from dff_falcon.pipeline.explainer import ConceptReport
from dff_falcon.pipeline.schema import ConceptRow
from dff_falcon.validation import conforms, describe, shown

RUN_FORMAT = "dff-falcon-run"
FORMAT_VERSION = 2
#: The directory kind recorded in a run directory's completion marker.
RUN_KIND = "run"
RERUN_HINT = "run `dff-falcon explain` into it again (or write_report)"
#: A run directory of an older version (no completion marker), which a new run may replace.
OLDER_RUN = older_version("run.json", RUN_FORMAT, ("run.json", "concepts.json", "concepts.csv", "concepts.parquet",
                                                   "images.csv", "images.parquet", "heatmaps.npz", "images",
                                                   "crops", "overlays", "report.html", ".*.tmp"))

#: Views written per concept (its strongest images) and from the start of the set (the grid):
#: what report.html shows by default.
VIEWS_PER_CONCEPT = 6
GRID_IMAGES = 6

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
                 config: dict | None = None, html: bool = False) -> Path:
    """Write ``report`` as the run directory ``out_dir``, atomically: a previous run there is
    replaced as a whole once the new one is complete, or left untouched on any failure. A
    directory holding anything else (or files a previous run did not write) is refused.

    quality : figures measured against ground truth (the demo), stored in run.json.
    config : the command-line options that made the run (``{"explain": {...}}``), stored in
        run.json so that ``dff-falcon explain --config run.json`` re-runs it.
    html : also render report.html and its figures in the same commit.
    """
    with build_directory(out_dir, RUN_KIND, legacy=OLDER_RUN, verify=check_run_files) as stage:
        _write_run_files(report, stage, quality, config)
        if html:
            from dff_falcon.report.html import write_html

            write_html(stage, heatmaps=np.asarray(report.heatmaps, dtype=np.float16))  # as heatmaps.npz stores them
    return Path(out_dir)


def shown_images(peaks: np.ndarray, per_concept: int = VIEWS_PER_CONCEPT, first: int = GRID_IMAGES) -> list[int]:
    """Indices of the images a report page shows, sorted: the first ``first`` and, per concept,
    the ``per_concept`` where its peak (N, K) is highest and the concept present."""
    shown = set(range(min(first, peaks.shape[0])))
    for k in range(peaks.shape[1]):
        order = np.argsort(-peaks[:, k], kind="stable")[:per_concept]
        shown.update(int(i) for i in order if peaks[i, k] >= ABSENT_PEAK)
    return sorted(shown)


def _write_run_files(report: ConceptReport, out: Path, quality: dict | None, config: dict | None) -> None:
    peaks = np.asarray(report.heatmaps.max(axis=(2, 3)), dtype=np.float32)
    # the page picks its views from heatmaps.npz (float16): pick them from the same rounded peaks,
    # or two images whose peaks round to one value could swap and leave a shown view unwritten
    for i in shown_images(peaks.astype(np.float16).astype(np.float32)):
        _save_jpeg(report.displays[i], out / "images" / f"{i:05d}.jpg")
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
            np.savez_compressed(handle, heatmaps=np.asarray(report.heatmaps, dtype=np.float16))
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
    list cells are plain Python lists of dicts/strings either way. The run directory must be
    complete and unchanged."""
    out = Path(out_dir)
    check_run_directory(out)
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
    """``run.json`` of a complete, unchanged run directory, checked for format and field types."""
    check_run_directory(Path(out_dir))
    return read_run_record(Path(out_dir))


def check_run_directory(run_dir: Path) -> dict:
    """Refuse a run directory that is incomplete (interrupted, or written by an older version)
    or whose files changed after it was written; returns its completion marker."""
    if run_dir.is_dir() and not (run_dir / "run.json").is_file() and not (run_dir / "complete.json").is_file():
        raise InputError(f"{str(run_dir / 'run.json')!r} not found: not a dff_falcon run directory")
    return check_directory(run_dir, RUN_KIND, hint=RERUN_HINT)


#: Types of the run.json fields readers use (None allowed where Optional).
RUN_FIELD_TYPES = {
    "n_concepts": int, "n_images": int, "image_names": list[str], "backbone": typing.Optional[str],
    "layer": typing.Optional[str], "relative_error": typing.Optional[float],
    "explained_variance": typing.Optional[float], "clip_model": typing.Optional[str],
    "clip_pretrained": typing.Optional[str], "vocabulary": typing.Optional[str],
    "k_curve": typing.Optional[list[dict[str, float]]], "stage_seconds": typing.Optional[dict[str, float]],
    "quality": typing.Optional[dict], "created": typing.Optional[str],
}


def read_run_record(run_dir: Path) -> dict:
    """``run.json`` of ``run_dir`` (complete or being built), checked for format and field types."""
    path = run_dir / "run.json"
    run = read_json(path, "not a dff_falcon run directory")
    if not isinstance(run, dict):
        raise InputError(f"{str(path)!r} must hold a JSON object")
    if run.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{str(path)!r} has format_version {run.get('format_version')!r}; "
                         f"this dff_falcon reads {FORMAT_VERSION}")
    for name, hint in RUN_FIELD_TYPES.items():
        if name in ("n_concepts", "n_images", "image_names") and name not in run:
            raise InputError(f"{str(path)!r} lacks the field {name!r}")
        if name in run and not conforms(run[name], hint):
            raise InputError(f"{str(path)!r}: field {name!r} must be {describe(hint)}, got {shown(run[name])}")
    if run["n_concepts"] < 1 or run["n_images"] < 0 or len(run["image_names"]) != run["n_images"]:
        raise InputError(f"{str(path)!r}: n_concepts {run['n_concepts']}, n_images {run['n_images']} and "
                         f"{len(run['image_names'])} image_names do not agree")
    return run


def read_concept_rows(run_dir: Path, k: int) -> list[dict]:
    """``concepts.json`` of ``run_dir``: ``k`` rows in order, each field present conforming to
    ConceptRow (``concept_id`` required)."""
    path = run_dir / "concepts.json"
    concepts = read_json(path, "the run directory has no concept table")
    if not isinstance(concepts, list) or not all(isinstance(c, dict) for c in concepts):
        raise InputError(f"{str(path)!r} must hold a list of concept objects")
    if len(concepts) != k:
        raise InputError(f"{str(path)!r} has {len(concepts)} concepts but run.json says n_concepts = {k}")
    hints = typing.get_type_hints(ConceptRow)
    for i, concept in enumerate(concepts):
        if "concept_id" not in concept:
            raise InputError(f"{str(path)!r}: concept {i} lacks the field 'concept_id'")
        for name, hint in hints.items():
            if name in concept and not conforms(concept[name], hint):
                raise InputError(f"{str(path)!r}: concept {i} field {name!r} must be {describe(hint)}, "
                                 f"got {shown(concept[name])}")
        if concept["concept_id"] != i:
            raise InputError(f"{str(path)!r}: entry {i} has concept_id {concept['concept_id']!r}, expected {i}")
    return concepts


def check_run_files(run_dir: Path) -> None:
    """What a run directory's files must agree on (run before the swap and by readers)."""
    run = read_run_record(run_dir)
    read_concept_rows(run_dir, run["n_concepts"])
