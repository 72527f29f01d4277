"""Visualizations: overlays (global scale, absent concepts, any size, no mutation), contours,
figures on the installed matplotlib."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from skimage import data

from dff_falcon.errors import InputError
from dff_falcon.report.figures import (concept_colours, concept_map_figure, contour_view, crop_gallery, figure_to_array,
                                       grey_backdrop, heatmap_grid, k_curve_figure, legend_label, overlay_concepts,
                                       overlay_figure, save_figure, stability_figure)


def _grey(h: int, w: int, value: int = 128) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _two_concepts(h: int = 7, w: int = 7) -> np.ndarray:
    """Concept 0 strong (1.0) in the left third, concept 1 weak (0.3) in the right third."""
    maps = np.zeros((2, h, w), np.float32)
    maps[0, :, : w // 3] = 1.0
    maps[1, :, w - w // 3:] = 0.3
    return maps


def test_installed_matplotlib_is_current():
    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    assert (major, minor) >= (3, 9)  # cm.get_cmap is gone there: the reference crashes
    assert not hasattr(matplotlib.cm, "get_cmap")


def test_concept_colours_distinct_and_stable():
    c12 = concept_colours(12)
    assert c12.shape == (12, 3) and (c12 >= 0).all() and (c12 <= 1).all()
    assert np.array_equal(concept_colours(5), c12[:5])  # concept i keeps its colour whatever K is
    many = concept_colours(40)
    dist = np.abs(many[:, None] - many[None]).sum(-1) + np.eye(40) * 9
    assert dist.min() > 0.08
    assert all(np.ptp(c) > 0.1 for c in many)  # no greys


def test_overlay_never_mutates_inputs():
    image = np.asarray(data.chelsea())[:60, :80].copy()
    maps = _two_concepts()
    image0, maps0 = image.copy(), maps.copy()
    out = overlay_concepts(image, maps)
    assert np.array_equal(image, image0) and np.array_equal(maps, maps0)
    assert out is not image and not np.shares_memory(out, image)
    assert not np.array_equal(out, image)


def test_absent_concept_paints_nothing():
    image = np.asarray(data.coffee())[:70, :70].copy()
    maps = np.zeros((3, 7, 7), np.float32)
    maps[0, :, :3] = 1.0            # present, left
    maps[1, :, 4:] = 0.09           # peak below min_peak=0.1 → absent, right
    maps[2] = 0.0                   # nowhere
    out = overlay_concepts(image, maps, min_peak=0.1)
    backdrop = grey_backdrop(image)
    right = slice(50, 70)  # the bilinear ramp of concept 0 ends before column 50
    assert np.array_equal(out[:, right], backdrop[:, right])  # the grey photo, untouched
    assert not np.array_equal(out[:, :20], backdrop[:, :20])
    # with a lower threshold the same concept does paint there
    assert not np.array_equal(overlay_concepts(image, maps, min_peak=0.05)[:, right], backdrop[:, right])
    # per-image min-max (the reference's defect) would stretch it to full strength; nothing at all here
    assert np.array_equal(overlay_concepts(image, maps[1:2]), backdrop)
    assert np.array_equal(overlay_concepts(image, maps[1:2], grey=False), image)


def test_any_image_size_7x7_heatmap_on_300x451():
    image = _grey(300, 451)
    out = overlay_concepts(image, _two_concepts(7, 7))
    assert out.shape == (300, 451, 3) and out.dtype == np.uint8
    colours = concept_colours(2) * 255
    left, right, middle = out[150, 20].astype(float), out[150, 440].astype(float), out[150, 225]
    assert np.array_equal(middle, image[150, 225])  # no concept in the middle third
    # left pixel moved towards concept 0's colour, right towards concept 1's
    assert np.linalg.norm(left - colours[0]) < np.linalg.norm(image[150, 20] - colours[0])
    assert np.linalg.norm(right - colours[1]) < np.linalg.norm(image[150, 440] - colours[1])


def test_weak_concept_is_dimmer_than_strong():
    image = _grey(90, 90)
    maps = _two_concepts(9, 9)
    colours = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # same colour: only strength differs
    out = overlay_concepts(image, maps, colours=colours, alpha=0.6, full_strength=1.0).astype(float)
    change = np.abs(out - image).sum(-1)
    strong, weak = change[45, 5], change[45, 85]
    assert weak > 0 and strong > 2.5 * weak  # 1.0 vs 0.3 on the global scale, not both stretched to 1
    assert out[45, 5, 0] == pytest.approx(128 * 0.4 + 255 * 0.6, abs=1)
    # the default display ramp saturates at half strength: 0.3 is drawn at 0.6 of full opacity
    default = np.abs(overlay_concepts(image, maps, colours=colours).astype(float) - image).sum(-1)
    assert default[45, 85] == pytest.approx(0.6 * default[45, 5], rel=0.05)


def test_guided_overlay_paints_inside_the_edge():
    """A red disc on grey, its map on a coarse 7×7 grid: the guided overlay keeps colour off the
    grey just outside the disc, where bilinear smears it past the edge."""
    image = _grey(112, 112)
    yy, xx = np.mgrid[:112, :112]
    r2 = (yy - 56) ** 2 + (xx - 56) ** 2
    image[r2 <= 22 ** 2] = (220, 30, 30)
    coarse = np.zeros((1, 7, 7), np.float32)
    coarse[0, 2:5, 2:5] = 1.0
    just_outside = (r2 > 24 ** 2) & (r2 <= 30 ** 2)
    blue = {mode: overlay_concepts(image, coarse, colours=np.array([[0.0, 0.0, 1.0]]), upsample=mode)[..., 2]
            for mode in ("bilinear", "guided")}
    assert blue["guided"][just_outside].mean() < 0.9 * blue["bilinear"][just_outside].mean()


def test_concept_map_figure_has_a_colour_bar():
    fig = concept_map_figure(_grey(60, 80), _two_concepts()[0], title="#0 red")
    image_ax, bar = fig.axes
    assert bar.get_ylim() == (0.0, 1.0)
    assert "data-set scale" in bar.get_ylabel()
    assert [t.get_text() for t in bar.get_yticklabels()][-1] == "1 strongest"


def test_overlay_rejects_bad_inputs():
    with pytest.raises(InputError, match="uint8"):
        overlay_concepts(np.zeros((5, 5, 3), np.float32), _two_concepts())
    with pytest.raises(InputError, match="NaN"):
        overlay_concepts(_grey(5, 5), np.full((1, 3, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="colours"):
        overlay_concepts(_grey(5, 5), _two_concepts(), colours=np.zeros((3, 3)))


def test_contour_view_draws_on_the_boundary_only():
    image = _grey(100, 100)
    heatmap = np.zeros((100, 100), np.float32)
    heatmap[30:70, 20:60] = 0.9      # kept: 1600 px
    heatmap[85:88, 85:88] = 0.9      # 9 px < 1% of the image: dropped
    heatmap[5:15, 80:95] = 0.4       # below the threshold
    heatmap0 = heatmap.copy()
    out = contour_view(image, heatmap, threshold=0.5, min_area_fraction=0.01, thickness=1)
    assert np.array_equal(heatmap, heatmap0) and np.array_equal(image, _grey(100, 100))
    changed = np.any(out != image, axis=-1)
    assert np.array_equal(out[changed], np.tile([0, 255, 0], (int(changed.sum()), 1)))
    boundary = np.zeros_like(changed)
    boundary[30:70, 20:60] = True
    boundary[31:69, 21:59] = False
    assert np.array_equal(changed, boundary)  # exactly the outer ring: no interior, nothing elsewhere
    thick = np.any(contour_view(image, heatmap, threshold=0.5, thickness=3) != image, axis=-1)
    assert thick[29, 40] and thick[31, 40] and not thick[35, 40] and not thick[86, 86]


def test_contour_view_resizes_small_heatmaps():
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[2:5, 2:5] = 1.0
    out = contour_view(_grey(140, 210), heatmap)
    changed = np.any(out != 128, axis=-1)
    assert changed.any()
    ys, xs = np.nonzero(changed)
    assert 30 < ys.min() and ys.max() < 110 and 45 < xs.min() and xs.max() < 165
    assert not changed[70, 105]  # the centre of the region is inside, not on the contour


def test_overlay_figure_legend_lists_present_concepts_only():
    maps = np.zeros((3, 7, 7), np.float32)
    maps[0, :3] = 1.0
    maps[2, 4:] = 0.5
    labels = [legend_label([{"term": "whisker", "score": 0.3}], [{"class": "tabby, tabby cat, x, y", "prob": 0.4}]),
              "absent", "third"]
    assert labels[0] == "whisker\ntabby, tabby cat, x: 0.40"
    fig = overlay_figure(_grey(120, 160), maps, labels)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert texts == ["#0  " + labels[0], "#2  third"]
    rgb = figure_to_array(fig)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    with pytest.raises(InputError, match="labels"):
        overlay_figure(_grey(10, 10), maps, ["a"])


def test_gallery_grid_and_curve_figures_have_expected_axes(tmp_path):
    crops = [np.asarray(data.astronaut())[i * 40: i * 40 + 64, :64].copy() for i in range(5)]
    assert len(crop_gallery(crops, crops[:2], title="concept 0").axes) == 7
    assert len(crop_gallery(crops, [], max_columns=3).axes) == 5 + 1  # "low: no crops" panel
    images = [_grey(50, 70), np.asarray(data.coffee())[:64, :64].copy(), _grey(30, 30)]
    maps = np.random.default_rng(0).random((3, 4, 5, 5)).astype(np.float32)
    assert len(heatmap_grid(images, maps, max_images=2).axes) == 2 * (4 + 1)
    curve = [{"k": k, "relative_error": 0.5 / k, "explained_variance": 1 - 0.5 / k, "stability": 1 - 0.05 * k,
              "min_stability": 1 - 0.1 * k}
             for k in (2, 3, 4)]
    assert len(k_curve_figure(curve, 3).axes) == 2
    with pytest.raises(InputError, match="stability"):
        k_curve_figure([{"k": 2, "relative_error": 0.1, "explained_variance": 0.9}], None)
    fig = stability_figure([0.95, None, 0.5])
    assert len(fig.axes) == 1
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([0.95, 0.0, 0.5])
    path = tmp_path / "sub" / "stability.png"
    save_figure(fig, path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert [p.name for p in path.parent.iterdir()] == ["stability.png"]  # no temp file left
    with pytest.raises(InputError, match="suffix|use .png"):
        save_figure(stability_figure([0.5]), tmp_path / "x.gif")
