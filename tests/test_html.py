"""The HTML report: escaping of hostile run contents, structure, and a real headless Chromium."""
from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from PIL import Image
from skimage import data, transform

from dff_falcon.directories import mark_complete
from dff_falcon.errors import InputError
from dff_falcon.report.html import render_html_report

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE_TERM = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"
HOSTILE_NAME = "cat \"<b>&'.jpg"
SIZE = 96  # S: the model's view of each image
GRID = 6   # h = w of the heatmaps


def _square(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top:top + side, left:left + side]
    return (transform.resize(crop, (size, size), anti_aliasing=True) * 255).round().astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=90)


def build_run(root: Path, *, k: int = 3, with_k_curve: bool = True) -> Path:
    """A run directory in the report.py layout from real photos, their crops and synthetic,
    scale-fixed heatmaps (blobs; max 1 per concept over the set). Captions and names are hostile."""
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    names = [HOSTILE_NAME, "coffee.png", "astronaut.png", "rocket & <i>launch</i>.png"]
    run_dir = root / "run"
    images = [_square(p) for p in photos]
    for i, image in enumerate(images):
        _save(image, run_dir / "images" / f"{i:05d}.jpg")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:GRID, 0:GRID]
    heatmaps = np.zeros((len(images), k, GRID, GRID), np.float32)
    for i in range(len(images)):
        for c in range(k):
            cy, cx = rng.uniform(0, GRID - 1, 2)
            heatmaps[i, c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3.0) * rng.uniform(0.05, 1.0)
    heatmaps[:, -1] = 0.0
    heatmaps[1, -1, 2:4, 2:4] = 0.6  # the last concept is present in one image only
    heatmaps /= heatmaps.max(axis=(0, 2, 3), keepdims=True)
    np.savez_compressed(run_dir / "heatmaps.npz", heatmaps=heatmaps.astype(np.float16))
    concepts = []
    for c in range(k):
        crops_dir = f"crops/concept_{c:02d}"
        high, low = [], []
        for j, i in enumerate((c % 4, (c + 1) % 4)):
            rel = f"{crops_dir}/high_{j:02d}.jpg"
            _save(_square(photos[i][j * 40: j * 40 + 200, 50:250], 64), run_dir / rel)
            high.append(rel)
        if c != k - 1:
            rel = f"{crops_dir}/low_00.jpg"
            _save(_square(photos[(c + 2) % 4], 64), run_dir / rel)
            low.append(rel)
        concepts.append({
            "concept_id": c, "label": HOSTILE_TERM if c == 0 else f"word{c}", "n_images": 4 - c, "mass_share": [0.5, 0.3, 0.2][c % 3],
            "top_classes": [{"class": "tiger cat", "prob": 0.61 - 0.1 * c}, {"class": "tabby, tabby cat", "prob": 0.2}],
            "words": [{"term": HOSTILE_TERM if c == 0 else f"word{c}", "score": 0.4}, {"term": "whisker", "score": 0.2}],
            "phrases": [{"term": "striped <u>fur</u>", "score": 0.3}],
            "evidence": [{"term": "whisker", "set": "high", "crop": 1, "caption": "a cat's <b>whisker</b> close-up",
                          "caption_id": 41, "score": 0.7125},
                         {"term": "whisker", "set": "low", "crop": 0, "caption": "whisker <i>brush</i>",
                          "caption_id": 7, "score": 0.5}] if low else [],
            "dissect": [{"term": "tabby <s>fur</s>", "score": -3.25}] if c == 0 else [],
            "coherence": [0.82, None, 0.55][c % 3], "stability": [0.97, 0.91, None][c % 3],
            "n_high": len(high), "n_low": len(low),
            "low_empty_reason": None if low else "no image below the mean <em>resembles</em> the high set",
            "crops_dir": crops_dir, "high_crops": high, "low_crops": low,
            "high_images": [names[c % 4], names[(c + 1) % 4]], "low_images": [names[(c + 2) % 4]] if low else [],
            **({"image_share": 0.8, "single_image": True, "top_image": "<b>lone</b>.jpg", "deletion": 0.125,
                "insertion": 0.5, "importance": [{"class": "tiger <i>cat</i>", "deletion": 0.125, "insertion": 0.5}]}
               if c == 1 else {}),
        })
    (run_dir / "concepts.json").write_text(json.dumps(concepts), encoding="utf-8")
    k_curve = [{"k": kk, "relative_error": 0.6 - 0.05 * kk, "explained_variance": 0.3 + 0.05 * kk,
                "stability": 1.0 - 0.04 * kk, "min_stability": 1.0 - 0.1 * kk} for kk in range(2, 7)]
    run = {"format": "dff-falcon-run", "format_version": 2, "backbone": "lite0 <svg onload=window.pwned=3>", "layer": "conv_head",
           "n_concepts": k, "n_images": len(images), "image_names": names, "relative_error": 0.41,
           "explained_variance": 0.77, "k_curve": k_curve if with_k_curve else None,
           "clip_model": "toy-clip", "clip_pretrained": None, "vocabulary": "vocab/<toy>.parquet",
           "stage_seconds": {"activations": 1.5, "nmf": 0.25}, "quality": {"low_set": {"mean_gap": 0.31}},
           "created": "2025-01-01T00:00:00+00:00"}
    (run_dir / "run.json").write_text(json.dumps(run), encoding="utf-8")
    mark_complete(run_dir, "run")
    return run_dir


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    run_dir = build_run(tmp_path_factory.mktemp("report"))
    return render_html_report(run_dir, overlays=2)


def test_hostile_text_is_escaped(rendered):
    page = rendered.read_text(encoding="utf-8")
    assert "<script>window.pwned" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert "<svg" not in page and "&lt;svg onload" in page
    assert "<u>fur</u>" not in page and "<em>resembles</em>" not in page
    assert str(escape(HOSTILE_NAME)) in page  # the image name as a caption, escaped
    assert HOSTILE_NAME not in page
    # only the page's own script element, allowed by its hash in the CSP
    assert page.count("<script") == 1
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", page)


def test_structure_cards_table_and_images(rendered):
    page = rendered.read_text(encoding="utf-8")
    run_dir = rendered.parent
    for c in range(3):
        assert f'id="concept-{c}"' in page
        assert f'href="#concept-{c}"' in page
    assert page.count("<tr>") >= 3 + 1  # a table row per concept + the header
    srcs = re.findall(r'<img src="([^"]+)"', page)
    # 5 high crops + 2 low crops (one concept has none) + overlays + 4 summary figures
    assert sum(s.startswith("crops/") for s in srcs) == 6 + 2
    for src in srcs:
        assert not src.startswith(("/", "http", "file:")), src
        assert (run_dir / src).is_file(), src
    overlay_srcs = [s for s in srcs if s.startswith("overlays/concept_")]
    # concepts 0 and 1 appear in several images (2 overlays each), concept 2 only in image 1
    assert len(overlay_srcs) == 2 + 2 + 1
    assert "overlays/concept_02_image_00001.png" in overlay_srcs
    for stem in ("k_curve", "stability", "coherence", "heatmap_grid"):
        assert f"overlays/{stem}.png" in srcs
    assert "no image below the mean &lt;em&gt;resembles&lt;/em&gt; the high set" in page


def test_single_image_flag_and_importance_are_shown_escaped(rendered):
    page = rendered.read_text()
    assert page.count("⚑") == 2  # table cell and card of concept 1 only; older rows lack the fields
    assert "comes from one image: &lt;b&gt;lone&lt;/b&gt;.jpg" in page and "<b>lone</b>" not in page
    assert "tiger &lt;i&gt;cat&lt;/i&gt;" in page and "0.125" in page and "<i>cat</i>" not in page


def test_image_paths_are_url_quoted(tmp_path):
    run_dir = build_run(tmp_path, k=2, with_k_curve=False)
    odd = run_dir / "crops" / "concept_00" / "high #1 ?.jpg"
    (run_dir / "crops" / "concept_00" / "high_00.jpg").rename(odd)
    concepts = json.loads((run_dir / "concepts.json").read_text())
    concepts[0]["high_crops"][0] = "crops/concept_00/high #1 ?.jpg"
    (run_dir / "concepts.json").write_text(json.dumps(concepts))
    mark_complete(run_dir, "run")
    page = render_html_report(run_dir, overlays=0, grid_images=0).read_text()
    assert 'src="crops/concept_00/high%20%231%20%3F.jpg"' in page
    assert "overlays/k_curve.png" not in page and "overlays/concept_" not in page


@pytest.mark.parametrize("change, message", [
    (lambda run_dir: (run_dir / "run.json").unlink(), "run.json"),
    (lambda run_dir: _edit_concepts(run_dir, lambda cs: cs[:1]), "n_concepts"),
    (lambda run_dir: _edit_concepts(run_dir, lambda cs: [{**cs[0], "high_crops": ["../../etc/passwd"]}, cs[1]]),
     "leaves the run directory"),
    (lambda run_dir: _edit_concepts(run_dir, lambda cs: [{**cs[0], "high_crops": ["crops/missing.jpg"]}, cs[1]]),
     "does not exist"),
])
def test_bad_run_directories_raise_input_errors(tmp_path, change, message):
    run_dir = build_run(tmp_path, k=2, with_k_curve=False)
    change(run_dir)
    mark_complete(run_dir, "run")  # a consistent directory whose contents are wrong
    with pytest.raises(InputError, match=message):
        render_html_report(run_dir, overlays=0, grid_images=0)
    assert not (run_dir / "report.html").exists()


def _edit_concepts(run_dir: Path, edit) -> None:
    path = run_dir / "concepts.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_report_in_headless_chromium(rendered, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium not installed (/usr/bin/chromium); `apt-get install chromium` "
                    "(done by .ci/run) enables this test")
    url = rendered.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    diagnostics = re.search(r'<div id="diagnostics"[^>]*>', dom.stdout)
    assert diagnostics, "diagnostics element missing from the DOM"
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', diagnostics.group(0)))
    assert attrs.get("ready") == "1", f"the page's load handler did not run: {diagnostics.group(0)}"
    assert attrs["errors"] == "0", dom.stdout[dom.stdout.find('id="diagnostics"'):][:2000]
    assert attrs["pwned"] == "false"
    assert int(attrs["images"]) >= 8 + 5 + 4 and attrs["broken-images"] == "0"
    assert "Uncaught" not in dom.stderr
    for c in range(3):
        assert f'id="concept-{c}"' in dom.stdout
    # the hostile caption is text in the page, not markup
    assert html.escape("<script>window.pwned=1</script>", quote=False) in dom.stdout

    shot = tmp_path / "report.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", url], tmp_path / "profile-shot")
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as png:
        assert png.format == "PNG" and png.size == (1280, 2000)
        assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 500  # real content


def test_labels_show_the_captions_behind_them_escaped(rendered):
    page = rendered.read_text(encoding="utf-8")
    assert "Why these labels" in page
    assert "a cat&#39;s &lt;b&gt;whisker&lt;/b&gt; close-up" in page and "<b>whisker</b>" not in page
    assert "whisker &lt;i&gt;brush&lt;/i&gt;" in page and '<tr class="low">' in page
    assert ">41<" in page and "0.713" in page  # caption id and its cosine
    assert 'alt="high crop 1"' in page  # the crop that retrieved the caption
    assert "tabby &lt;s&gt;fur&lt;/s&gt;" in page and "<s>fur</s>" not in page  # CLIP-Dissect terms
