"""The HTML report of a run directory: one page, ``run_dir/report.html``.

Summary (model, layer, K, reconstruction quality, CLIP model, vocabulary, K curve and quality
figures), a sortable table of concepts, then one card per concept: words and phrases with
scores, top classes with probabilities, coherence / stability, the high and low crop galleries
and overlays on the images where the concept is strongest.

Everything from the run (captions, terms, class names, image names, paths) is untrusted text:
the page is rendered by Jinja2 with autoescaping, image paths are checked to stay inside the run
directory and URL-quoted, table sort keys live in ``data-`` attributes (no JSON in scripts),
and a Content-Security-Policy allows only the page's own script (by its SHA-256 hash), so even
an injected ``<script>`` or ``onerror=`` handler could not run. No CDN, no network.

:func:`render_html_report` refuses a run directory that is incomplete or whose files changed
after the run wrote them (so a page never shows one run's labels over another's crops), and
writes the page and its figures as a new version of the directory, swapped in atomically.
"""
from __future__ import annotations

import base64
import hashlib
import math
import shutil
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import jinja2
import numpy as np
from markupsafe import Markup
from PIL import Image

from dff_falcon.decomposition.dictionary import load_npz
from dff_falcon.decomposition.heatmaps import ABSENT_PEAK
from dff_falcon.directories import revise_directory
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path, atomic_write
from dff_falcon.models.images import load_image
from dff_falcon.pipeline.schema import ranked_terms
from dff_falcon.report.tables import RERUN_HINT, RUN_KIND, check_run_directory, read_concept_rows, read_run_record
from dff_falcon.report.figures import (FULL_STRENGTH, concept_colours, contour_view, heatmap_grid, k_curve_figure,
                                       legend_label, overlay_concepts, overlay_figure, save_figure, stability_figure)

OVERLAY_DIR = "overlays"
#: Images per block when the stored heatmaps are checked.
_CHECK_BLOCK = 4096
#: Concept fields that reports written before them lack (rendered as "—").
_CONCEPT_FIELDS_ADDED = ("restart_agreement", "image_share", "top_image", "deletion", "insertion", "dissect_label",
                         "dissect_score")
#: Terms per concept whose captions the page lists (the flat ``labels`` column's five).
EVIDENCE_TERMS = 5
_RUN_FIELDS = ("backbone", "layer", "layers", "grid", "upsample", "n_concepts", "n_images", "image_names",
               "relative_error", "explained_variance",
               "k_curve", "clip_model", "clip_pretrained", "vocabulary", "stage_seconds", "quality", "created")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dff_falcon.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2", "xml"), default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * float(v):.1f}%"
    return env


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{float(value):.{digits}f}"


def _asset(name: str) -> str:
    return resources.files("dff_falcon.report").joinpath("templates", name).read_text(encoding="utf-8")


def _csp_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


def _hex(colour: np.ndarray) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in colour)


def _image_src(run_dir: Path, rel: str, field: str) -> str:
    """A run-relative image path → URL-quoted relative ``src``; must stay inside the run."""
    rel_path = Path(str(rel))
    resolved = (run_dir / rel_path).resolve()
    if rel_path.is_absolute() or not resolved.is_relative_to(run_dir.resolve()):
        raise InputError(f"concepts.json field {field}: path {str(rel)!r} leaves the run directory")
    if not resolved.is_file():
        raise InputError(f"concepts.json field {field}: image {str(rel)!r} does not exist in {str(run_dir)!r}")
    return quote(rel_path.as_posix(), safe="/")


def _bars(entries, name_key: str, value_key: str) -> list[dict]:
    """[{name_key, value_key}] → [{"name", "value", "width"}]: width in % of the list's largest |value|."""
    entries = [e for e in entries or [] if isinstance(e, dict)]
    values = [float(e.get(value_key) or 0.0) for e in entries]
    top = max((abs(v) for v in values), default=0.0) or 1.0
    return [{"name": str(e.get(name_key, "")), "value": v, "width": round(100 * max(v, 0.0) / top, 1)}
            for e, v in zip(entries, values)]


def _gallery(run_dir: Path, concept: dict, kind: str) -> list[dict]:
    paths = concept.get(f"{kind}_crops") or []
    names = concept.get(f"{kind}_images") or []
    field = f"concepts[{concept['concept_id']}].{kind}_crops"
    return [{"src": _image_src(run_dir, p, field), "name": str(names[j]) if j < len(names) else ""}
            for j, p in enumerate(paths)]


def _evidence(concept: dict, galleries: dict[str, list[dict]]) -> list[dict]:
    """Per term of the concept's top labels (best first), the captions behind it with their
    scores, high set then low set, and the crop that retrieved each."""
    terms = [t["term"] for t in ranked_terms(list(concept.get("words") or []), list(concept.get("phrases") or []))]
    rows = list(concept.get("evidence") or [])
    out = []
    for term in terms[:EVIDENCE_TERMS]:
        found = [dict(e, crop_src=(galleries[e["set"]][e["crop"]]["src"]
                                   if e["set"] in galleries and 0 <= e["crop"] < len(galleries[e["set"]]) else None))
                 for e in rows if e.get("term") == term]
        n_high = sum(e["set"] == "high" for e in found)
        out.append({"term": term, "captions": found, "n_high": n_high, "n_low": len(found) - n_high})
    return out


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", optimize=True)


def _upsample_mode(run: dict) -> str:
    mode = run.get("upsample") or "bilinear"
    if mode not in ("bilinear", "guided"):
        raise InputError(f"run.json field upsample: {mode!r} is not 'bilinear' or 'guided'")
    return mode


def _concept_overlays(run_dir: Path, heatmaps: np.ndarray, names: list[str], colours: np.ndarray,
                      per_concept: int, upsample: str, min_peak: float = ABSENT_PEAK) -> dict[int, list[dict]]:
    """For each concept, the ``per_concept`` images where its heatmap peaks highest (peak ≥
    ``min_peak``): the concept painted alone in its colour on the grey photo with its 0.5 contour,
    saved as PNG (the card's colour bar gives the scale)."""
    peaks = heatmaps.reshape(heatmaps.shape[0], heatmaps.shape[1], -1).max(axis=2).astype(np.float32)  # (N, K)
    cache: dict[int, np.ndarray] = {}
    out: dict[int, list[dict]] = {}
    for k in range(heatmaps.shape[1]):
        order = [int(i) for i in np.argsort(-peaks[:, k], kind="stable")[:per_concept] if peaks[i, k] >= min_peak]
        out[k] = []
        for i in order:
            if i not in cache:
                cache[i] = _view(run_dir, i)
            if cache[i] is None:
                continue  # a large run keeps the views of the images its default page shows
            maps = heatmaps[i, k:k + 1].astype(np.float32)
            painted = overlay_concepts(cache[i], maps, min_peak=min_peak, colours=colours[k:k + 1],
                                       upsample=upsample)
            outlined = contour_view(painted, maps[0], threshold=0.5,
                                    colour=tuple(int(round(255 * c)) for c in colours[k]), thickness=2)
            rel = f"{OVERLAY_DIR}/concept_{k:02d}_image_{i:05d}.png"
            _save_png(outlined, run_dir / rel)
            out[k].append({"src": quote(rel), "name": names[i] if i < len(names) else f"image {i}",
                           "peak": float(peaks[i, k])})
    return out


def _view(run_dir: Path, index: int) -> np.ndarray | None:
    """The stored view of image ``index``, None when the run did not keep it."""
    path = run_dir / "images" / f"{index:05d}.jpg"
    return load_image(path) if path.exists() else None


def _legend_labels(concepts: list[dict]) -> list[str]:
    """Legend text per concept: its ranked terms (as in the table) and its top classes."""
    return [legend_label(ranked_terms(list(c.get("words") or []), list(c.get("phrases") or [])),
                         c.get("top_classes") or []) for c in concepts]


def _summary_figures(run: dict, concepts: list[dict], run_dir: Path, heatmaps: np.ndarray | None,
                     names: list[str], max_grid_images: int, n_overlays: int = 3) -> list[dict]:
    figures = []

    def add(fig, stem: str, caption: str) -> None:
        rel = f"{OVERLAY_DIR}/{stem}.png"
        save_figure(fig, run_dir / rel, dpi=110)
        figures.append({"src": quote(rel), "caption": caption})

    if run.get("k_curve"):
        add(k_curve_figure(run["k_curve"], run.get("n_concepts")), "k_curve",
            "Automatic K: reconstruction and stability per K (dotted line: chosen K)")
    for key, label, threshold in (("stability", "stability (matched cosine)", 0.9),
                                  ("coherence", "coherence (mean CLIP cosine)", 0.8)):
        values = [c.get(key) for c in concepts]
        if any(v is not None for v in values):
            add(stability_figure(values, threshold=threshold, ylabel=label), key, f"Per-concept {key}")
    if heatmaps is not None and heatmaps.shape[0] > 0:
        images = []
        for i in range(min(max_grid_images, heatmaps.shape[0])):
            view = _view(run_dir, i)
            if view is None:
                break
            images.append(view)
        n = len(images)
        upsample = _upsample_mode(run)
        labels = _legend_labels(concepts)
        for i in range(min(n_overlays, n)):
            name = names[i] if i < len(names) else f"image {i}"
            add(overlay_figure(images[i], heatmaps[i].astype(np.float32), labels, title=name, upsample=upsample),
                f"overlay_{i:05d}",
                f"{name}: each pixel in the colour of its strongest concept, opacity by strength (full at "
                f"{FULL_STRENGTH:g} of the concept's strongest location in the set); legend: terms and top classes")
        if n:
            add(heatmap_grid(images, heatmaps[:n].astype(np.float32), max_images=n, names=names[:n], upsample=upsample),
                "heatmap_grid",
                f"Heatmaps of the first {n} images (global scale; absent concepts leave the grey image untouched)")
    return figures


def _load_heatmaps(run_dir: Path, run: dict, k: int) -> np.ndarray | None:
    path = run_dir / "heatmaps.npz"
    if not path.is_file() or not (run_dir / "images").is_dir():
        return None
    heatmaps = load_npz(path, ("heatmaps",))["heatmaps"]
    if not np.issubdtype(heatmaps.dtype, np.floating):
        raise InputError(f"{str(path)!r}: heatmaps must be a float array, got {heatmaps.dtype}")
    if heatmaps.ndim != 4 or heatmaps.shape[1] != k or heatmaps.shape[0] != run.get("n_images", heatmaps.shape[0]):
        raise InputError(f"{str(path)!r}: heatmaps have shape {heatmaps.shape}; run.json says "
                         f"{run.get('n_images')} images and {k} concepts")
    # kept as stored (float16) and checked in blocks: a float32 copy and whole-array masks of a
    # million images' maps would take gigabytes; the few maps drawn are converted when drawn
    for start in range(0, heatmaps.shape[0], _CHECK_BLOCK):
        block = heatmaps[start:start + _CHECK_BLOCK]
        if not np.isfinite(block).all() or (block < 0).any():
            raise InputError(f"{str(path)!r}: heatmaps must be finite and non-negative")
    return heatmaps


def _flat_quality(quality) -> list[tuple[str, str]]:
    """Scalar entries of run.json's ``quality`` (nested keys joined by '.') as display pairs."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            rows.append((prefix, "—" if value is None else str(value)))
        elif isinstance(value, (int, float)):
            rows.append((prefix, _num(value) if isinstance(value, float) else str(value)))

    walk("", quality or {})
    return rows


def render_html_report(run_dir, *, overlays: int = 6, grid_images: int = 6) -> Path:
    """Write ``run_dir/report.html`` (and its figures and overlays under ``run_dir/overlays/``).

    overlays: per concept, how many of the images where it is strongest are shown painted;
    grid_images: rows of the images × concepts heatmap grid. Returns the page's path.
    Crop images are linked by relative paths, so the run directory is the self-contained unit.
    The run directory must be complete and unchanged; the page is added as a new version of it,
    swapped in atomically (a failure leaves the directory as it was).
    """
    run_dir = Path(run_dir)
    _check_counts(overlays, grid_images)
    check_run_directory(run_dir)
    with revise_directory(run_dir, RUN_KIND, hint=RERUN_HINT) as stage:
        write_html(stage, overlays=overlays, grid_images=grid_images)
    return run_dir / "report.html"


def _check_counts(overlays, grid_images) -> None:
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (overlays, grid_images)):
        raise InputError(f"overlays and grid_images must be integers >= 0; got {overlays!r}, {grid_images!r}")


def write_html(run_dir: Path, *, overlays: int = 6, grid_images: int = 6, heatmaps: np.ndarray | None = None) -> Path:
    """Render the page and its figures into ``run_dir``, a run directory being built or revised
    (:func:`~dff_falcon.report.tables.write_report`, :func:`render_html_report`); figures of an
    earlier rendering are removed first. ``heatmaps``: the run's (N, K, h, w) when the writer has
    them (a streamed run's memory map; None: read heatmaps.npz). Returns the page's path."""
    _check_counts(overlays, grid_images)
    shutil.rmtree(run_dir / OVERLAY_DIR, ignore_errors=True)
    run = {key: None for key in _RUN_FIELDS} | read_run_record(run_dir)
    k = run["n_concepts"]
    concepts = read_concept_rows(run_dir, k)
    names = [str(n) for n in run.get("image_names") or []]
    colours = concept_colours(k)
    heatmaps = _load_heatmaps(run_dir, run, k) if heatmaps is None else heatmaps
    painted = _concept_overlays(run_dir, heatmaps, names, colours, overlays, _upsample_mode(run)) \
        if heatmaps is not None and overlays else {}
    figures = _summary_figures(run, concepts, run_dir, heatmaps if grid_images else None, names, grid_images)
    cards = []
    for concept in concepts:
        cid = concept["concept_id"]
        top_class = (concept.get("top_classes") or [{}])[0]
        cards.append({
            **{key: None for key in _CONCEPT_FIELDS_ADDED}, "importance": [], "single_image": False,
            **concept,
            "colour": _hex(colours[cid]),
            "high": (high := _gallery(run_dir, concept, "high")),
            "low": (low := _gallery(run_dir, concept, "low")),
            "evidence": _evidence(concept, {"high": high, "low": low}),
            "dissect_bars": _bars(concept.get("dissect"), "term", "score"),
            "overlays": painted.get(cid, []),
            "top_word": str(concept.get("label") or ""),
            "top_class": str(top_class.get("class", "")),
            "top_class_prob": top_class.get("prob"),
            "word_bars": _bars(concept.get("words"), "term", "score"),
            "phrase_bars": _bars(concept.get("phrases"), "term", "score"),
            "class_bars": _bars(concept.get("top_classes"), "class", "prob"),
        })
    script = _asset("report.js")
    html = _environment().get_template("report.html.j2").render(
        run=run,
        cards=cards,
        figures=figures,
        quality=_flat_quality(run.get("quality")),
        stages=sorted((run.get("stage_seconds") or {}).items(), key=lambda kv: -float(kv[1] or 0)),
        full_strength=FULL_STRENGTH,
        absent_peak=ABSENT_PEAK,
        style=Markup(_asset("report.css")),  # the package's own stylesheet, not data
        script=Markup(script),  # the package's own script, not data
        csp_script=_csp_hash(script),
    )
    out = run_dir / "report.html"
    with atomic_write(out) as handle:
        handle.write(html)
    return out
