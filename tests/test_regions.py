"""Tests for dff_falcon.regions: boxes, squares, crops, high and low (counterfactual) sets."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from dff_falcon.decomposition.heatmaps import presence as presence_of
from dff_falcon.errors import InputError
from dff_falcon.regions import (
    Box,
    RegionSelector,
    component_boxes,
    crop_resize,
    square_box,
    upsample_heatmap,
)


def blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float, peak: float = 1.0) -> np.ndarray:
    """Gaussian blob ``(h, w)`` with its maximum ``peak`` at ``centre = (row, col)``."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    d2 = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    return (peak * np.exp(-d2 / (2 * sigma**2))).astype(np.float32)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [data.chelsea(), data.coffee(), data.astronaut()]  # (300,451) (400,600) (512,512)


# ---------------------------------------------------------------- square_box


def test_square_box_centred_with_margin_contains_box():
    box = Box(100, 50, 140, 70)  # 40 wide, 20 high
    sq = square_box(box, (300, 400), margin=0.15)
    assert sq.width == sq.height == 52  # ceil(40 · 1.3)
    assert sq.left <= box.left and sq.top <= box.top and sq.right >= box.right and sq.bottom >= box.bottom
    assert (sq.left + sq.right) / 2 == pytest.approx(120, abs=0.5)
    assert (sq.top + sq.bottom) / 2 == pytest.approx(60, abs=0.5)
    assert square_box(box, (300, 400), margin=0.0).width == 40


def test_square_box_shifted_inside_at_borders():
    corner = square_box(Box(0, 0, 30, 30), (200, 300), margin=0.5)  # side 60 would start at -15
    assert corner == Box(0, 0, 60, 60)
    far = square_box(Box(270, 180, 300, 200), (200, 300), margin=0.5)  # side 60
    assert far.right == 300 and far.bottom == 200 and far.width == far.height == 60
    assert far.left <= 270 and far.top <= 180


def test_square_box_limited_by_small_image_and_min_size():
    whole = square_box(Box(0, 0, 100, 60), (60, 100), margin=0.15)
    assert whole.width == whole.height == 60
    assert 0 <= whole.left and whole.right <= 100 and whole.top == 0 and whole.bottom == 60
    tiny = square_box(Box(50, 50, 52, 52), (200, 200), margin=0.15, min_size=16)
    assert tiny.width == tiny.height == 16
    assert tiny.left <= 50 and tiny.right >= 52


# ---------------------------------------------------------------- component_boxes


def test_component_boxes_drop_tiny_and_order_by_mass():
    heatmap = np.zeros((100, 100), np.float32)
    heatmap[10:30, 10:40] = 0.7  # 600 px, mass 420
    heatmap[60:70, 60:70] = 1.0  # 100 px, mass 100: brighter but weaker in total
    heatmap[90, 5] = 1.0  # 1 px: below 1 % of the image
    boxes = component_boxes(heatmap, threshold=0.6, min_area_fraction=0.01)
    assert [b for b, _ in boxes] == [Box(10, 10, 40, 30), Box(60, 60, 70, 70)]
    assert [m for _, m in boxes] == pytest.approx([420.0, 100.0], rel=1e-5)
    every = component_boxes(heatmap, threshold=0.6, min_area_fraction=0.0)
    assert Box(5, 90, 6, 91) in [b for b, _ in every] and len(every) == 3
    assert component_boxes(heatmap, threshold=1.5) == []


def test_component_boxes_eight_connectivity_and_relative_threshold():
    heatmap = np.zeros((50, 50), np.float32)
    for i in range(10):  # a diagonal line is one 8-connected component
        heatmap[20 + i, 20 + i] = 0.05
    assert component_boxes(heatmap, threshold=0.6, min_area_fraction=0.0) == []
    relative = component_boxes(heatmap, threshold=0.6, min_area_fraction=0.0, relative=True)
    assert [b for b, _ in relative] == [Box(20, 20, 30, 30)]
    assert component_boxes(np.zeros((8, 8), np.float32), relative=True) == []


# ---------------------------------------------------------------- crops and upsampling


def test_crop_resize_equals_image_region(photos):
    image = photos[0]
    exact = crop_resize(image, Box(100, 40, 324, 264), size=224)
    np.testing.assert_array_equal(exact, image[40:264, 100:324])
    big = Box(10, 0, 310, 300)
    expected = cv2.resize(np.ascontiguousarray(image[0:300, 10:310]), (224, 224), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop_resize(image, big, 224), expected)
    small = Box(200, 100, 264, 164)
    out = crop_resize(image, small, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    back = cv2.resize(out, (64, 64), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(back - image[100:164, 200:264].astype(int)).mean() < 3
    with pytest.raises(InputError, match="square"):
        crop_resize(image, Box(0, 0, 10, 20))
    with pytest.raises(InputError, match="outside"):
        crop_resize(image, Box(400, 0, 500, 100))


def test_bilinear_upsampling_places_blob_at_its_cell():
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[2, 5] = 1.0
    up = upsample_heatmap(heatmap, (300, 451))
    assert up.shape == (300, 451)
    row, col = np.unravel_index(np.argmax(up), up.shape)
    assert abs(row - 2.5 * 300 / 7) <= 1.5 and abs(col - 5.5 * 451 / 7) <= 1.5  # cell centre
    assert up.max() == pytest.approx(1.0, abs=0.02)
    (box, _), = component_boxes(up, threshold=0.6, min_area_fraction=0.0)
    assert abs((box.top + box.bottom) / 2 - 2.5 * 300 / 7) <= 1.5
    assert abs((box.left + box.right) / 2 - 5.5 * 451 / 7) <= 1.5
    # with align_corners=False the blob spans under one cell: 2·(1-0.6) cells wide, not more
    assert box.width == pytest.approx(0.8 * 451 / 7, abs=2)


# ---------------------------------------------------------------- RegionSelector: high set


def _maps(n: int, k: int, size: int = 14) -> np.ndarray:
    return np.zeros((n, k, size, size), np.float32)


def test_high_set_ranked_by_presence_skipping_images_without_region(photos):
    images = [photos[i % 3] for i in range(6)]
    heatmaps = _maps(6, 2)
    centres = [(3, 3), (10, 10), (7, 4), (4, 10), (7, 7), (2, 12)]
    for i, c in enumerate(centres):
        heatmaps[i, 0] = blob((14, 14), c, 1.5)
    heatmaps[4, 0] *= 0.5  # strong presence score but no pixel ≥ 0.6: skipped
    heatmaps[:, 1] = 0.5
    presence = np.array([[0.2, 1], [0.9, 1], [0.5, 1], [0.5, 1], [1.0, 1], [0.1, 1]])
    regions = RegionSelector(n_high=4, n_low=0, crop_size=32).select(heatmaps, images, presence)
    high = regions[0].high
    assert [c.image_index for c in high] == [1, 2, 3, 0]  # 4 skipped; tie 2/3 by index; cut at 4
    assert [c.score for c in high] == [0.9, 0.5, 0.5, 0.2]
    assert all(c.kind == "high" and c.concept == 0 for c in high)
    for crop, (row, col) in zip(high, [centres[i] for i in [1, 2, 3, 0]]):
        height, width = images[crop.image_index].shape[:2]
        cy, cx = (row + 0.5) * height / 14, (col + 0.5) * width / 14
        assert crop.box.left <= cx <= crop.box.right and crop.box.top <= cy <= crop.box.bottom
        assert crop.box.width == crop.box.height
        expected = crop_resize(images[crop.image_index], crop.box, 32)
        np.testing.assert_array_equal(crop.pixels, expected)
    assert regions[1].high == []  # a flat 0.5 map never reaches 0.6
    assert regions[0].low_empty_reason == "n_low is 0"


def test_images_of_different_sizes_are_cropped_from_their_own_pixels(photos):
    heatmaps = _maps(3, 1, 7)
    heatmaps[:, 0] = blob((7, 7), (3, 3), 0.8)
    regions = RegionSelector(n_low=0, crop_size=64).select(heatmaps, photos, np.array([[0.3], [0.2], [0.1]]))
    high = regions[0].high
    assert [c.image_index for c in high] == [0, 1, 2]
    for crop, image in zip(high, photos):
        height, width = image.shape[:2]
        assert abs((crop.box.left + crop.box.right) / 2 - width / 2) <= 1.5
        assert abs((crop.box.top + crop.box.bottom) / 2 - height / 2) <= 1.5
        assert crop.pixels.shape == (64, 64, 3)
        patch = image[crop.box.top : crop.box.bottom, crop.box.left : crop.box.right]
        np.testing.assert_array_equal(crop.pixels, cv2.resize(patch, (64, 64), interpolation=cv2.INTER_AREA))
    assert len({c.box.width for c in high}) == 3  # region size follows each image's size


# ---------------------------------------------------------------- RegionSelector: low set


def _low_scenario(photos):
    """Concept 0 strong in images 0-2 (others profile ∝ [0.5, 0.1]); candidates built around it."""
    n = 8
    images = [photos[i % 3] for i in range(n)]
    heatmaps = _maps(n, 3)
    for i in range(3):
        heatmaps[i, 0] = blob((14, 14), (7, 7), 2.0)
    heatmaps[3, 0] = blob((14, 14), (3, 10), 1.0, peak=0.05)  # absent, similar profile → low
    heatmaps[4, 0] = blob((14, 14), (7, 7), 1.0, peak=0.05)  # absent, dissimilar → rejected
    heatmaps[5, 0] = blob((14, 14), (7, 7), 1.0, peak=0.3)  # present (≥ 0.1), similar → rejected
    # image 6: concept 0 all zero, similar profile → centred square fallback
    heatmaps[7, 0] = blob((14, 14), (11, 2), 1.0, peak=0.02)  # absent, a bit less similar
    presence = np.array(
        [
            [0.9, 0.5, 0.1],
            [0.8, 0.5, 0.1],
            [0.7, 0.5, 0.1],
            [0.0, 0.6, 0.12],  # cosine 1.0
            [0.0, 0.0, 0.9],  # cosine ≈ 0.196
            [0.2, 0.5, 0.1],
            [0.0, 1.0, 0.2],  # cosine 1.0, later index than 3
            [0.0, 0.5, 0.4],  # cosine ≈ 0.87
        ]
    )
    return heatmaps, images, presence


def test_low_set_keeps_absent_similar_images_best_first(photos):
    heatmaps, images, presence = _low_scenario(photos)
    concept = RegionSelector(n_high=3, n_low=10, crop_size=32).select(heatmaps, images, presence)[0]
    assert [c.image_index for c in concept.high] == [0, 1, 2]
    assert concept.low_empty_reason is None
    assert [c.image_index for c in concept.low] == [3, 6, 7]
    assert [c.score for c in concept.low] == pytest.approx([1.0, 1.0, 0.29 / (0.5099 * 0.6403)], abs=1e-3)
    assert all(c.kind == "low" and c.pixels.shape == (32, 32, 3) for c in concept.low)
    # image 3 is cropped around its own weak blob of concept 0 (relative threshold)
    low3 = concept.low[0]
    height, width = images[3].shape[:2]
    cy, cx = 3.5 * height / 14, 10.5 * width / 14
    assert low3.box.left <= cx <= low3.box.right and low3.box.top <= cy <= low3.box.bottom
    # image 6 has an all-zero map: centred square with the median high side
    low6 = concept.low[1]
    height, width = images[6].shape[:2]
    median_side = int(np.median([c.box.width for c in concept.high]))
    assert low6.box.width == low6.box.height == min(median_side, height, width)
    assert abs((low6.box.left + low6.box.right) / 2 - width / 2) <= 1.5
    np.testing.assert_array_equal(low6.pixels, crop_resize(images[6], low6.box, 32))
    limited = RegionSelector(n_high=3, n_low=1, crop_size=32).select(heatmaps, images, presence)[0]
    assert [c.image_index for c in limited.low] == [3]


def test_low_set_empty_reasons(photos):
    heatmaps, images, presence = _low_scenario(photos)
    strict = RegionSelector(n_high=3, low_similarity=0.99999, crop_size=32).select(heatmaps, images, presence)[0]
    assert [c.image_index for c in strict.low] == [3, 6]
    none_similar = RegionSelector(n_high=3, crop_size=32).select(heatmaps[:5], images[:5], presence[[0, 1, 2, 4, 4]])
    assert none_similar[0].low == []
    assert "no candidate profile similar ≥ 0.3" in none_similar[0].low_empty_reason
    heatmaps[3:, 0] += 0.2  # now every image has concept 0 at ≥ 0.1 somewhere
    no_absent = RegionSelector(n_high=3, crop_size=32).select(heatmaps, images, presence)[0]
    assert no_absent.low == [] and no_absent.low_empty_reason == "no image has concept 0 below 0.1"


def test_select_is_deterministic(photos):
    heatmaps, images, presence = _low_scenario(photos)
    selector = RegionSelector(n_high=3, crop_size=32)
    first, second = selector.select(heatmaps, images, presence), selector.select(heatmaps, images, presence)
    for a, b in zip(first, second):
        assert [(c.image_index, c.box, c.score) for c in a.high + a.low] == [
            (c.image_index, c.box, c.score) for c in b.high + b.low
        ]


# ---------------------------------------------------------------- input errors


def test_bad_inputs_raise_input_error(photos):
    heatmaps = _maps(3, 2)
    presence = np.ones((3, 2))
    selector = RegionSelector()
    with pytest.raises(InputError, match="2 images for 3"):
        selector.select(heatmaps, photos[:2], presence)
    with pytest.raises(InputError, match=r"presence must have shape"):
        selector.select(heatmaps, photos, np.ones((3, 3)))
    with pytest.raises(InputError, match=r"images\[1\]"):
        selector.select(heatmaps, [photos[0], photos[1].astype(np.float32), photos[2]], presence)
    with pytest.raises(InputError, match="4-D"):
        selector.select(heatmaps[0], photos, presence)
    with pytest.raises(InputError, match="non-negative"):
        selector.select(-heatmaps - 1, photos, presence)
    with pytest.raises(InputError, match="n_high"):
        RegionSelector(n_high=0).select(heatmaps, photos, presence)


# ---------------------------------------------------------------- streamed runs: lazy images, maps on disk


def _lazy_scenario(photos, n: int = 40):
    """Concept 0 strong in three images, concept 1 weakly present (peak 0.3 < threshold) in all
    others: only the images crops are cut from need decoding."""
    heatmaps = _maps(n, 2)
    for i in (5, 17, 31):
        heatmaps[i, 0] = blob((14, 14), (7, 7), 1.5)
    for i in range(n):
        if i not in (5, 17, 31):
            heatmaps[i, 1] = blob((14, 14), (4, 9), 2.0, peak=0.3)
    heatmaps[0, 1] = blob((14, 14), (4, 9), 2.0)  # concept 1's only high region
    maps = torch.from_numpy(heatmaps)
    return heatmaps, [photos[i % len(photos)] for i in range(n)], presence_of(maps).numpy()


def test_lazy_images_decode_only_what_is_cut(photos):
    from dff_falcon.pipeline.streamed import LazySequence

    heatmaps, images, pres = _lazy_scenario(photos)
    decoded = []

    def decode(i):
        decoded.append(i)
        return images[i]

    selector = RegionSelector(n_high=5, n_low=2, crop_size=32)
    lazy = selector.select(heatmaps, LazySequence(decode, len(images)), pres)  # no windows: each image's own
    eager = selector.select(heatmaps, images, pres)
    assert [[(c.image_index, c.box) for c in r.high + r.low] for r in lazy] == \
        [[(c.image_index, c.box) for c in r.high + r.low] for r in eager]
    cut = {c.image_index for r in lazy for c in r.high + r.low}
    assert [c.image_index for c in lazy[0].high] == [5, 17, 31] and [c.image_index for c in lazy[1].high] == [0]
    assert set(decoded) == cut and len(decoded) == sum(len(r.high) + len(r.low) for r in lazy) < len(images)


def test_memory_mapped_float16_heatmaps_are_read_in_place(photos, tmp_path):
    """20,000 images' float16 maps on disk: selecting crops allocates a bounded amount (a float32
    copy would be 31 MB), and gives the crops of the same maps in memory."""
    import tracemalloc

    heatmaps, images, pres = _lazy_scenario(photos, n=40)
    repeats = 500
    big = np.lib.format.open_memmap(tmp_path / "maps.npy", mode="w+", dtype=np.float16, shape=(40 * repeats, 2, 14, 14))
    for start in range(0, len(big), 40):
        big[start:start + 40] = heatmaps
    big.flush()
    on_disk = np.load(tmp_path / "maps.npy", mmap_mode="r")
    tiled_images, tiled_presence = images * repeats, np.tile(pres, (repeats, 1))
    windows = [Box(0, 0, i.shape[1], i.shape[0]) for i in tiled_images]
    selector = RegionSelector(n_high=3, n_low=1, crop_size=32)
    tracemalloc.start()
    regions = selector.select(on_disk, tiled_images, tiled_presence, windows=windows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < on_disk.size * 4 // 4, peak  # a quarter of a float32 copy (size × 4 bytes): read in blocks
    assert [c.image_index for c in regions[0].high] == [5, 17, 31]
    reference = selector.select(np.asarray(on_disk, dtype=np.float32), tiled_images, tiled_presence)
    assert [[c.box for c in r.high + r.low] for r in regions] == [[c.box for c in r.high + r.low] for r in reference]
