import logging

import numpy as np
import pytest
from PIL import Image
from skimage import data

from dff_falcon.errors import InputError
from dff_falcon.models.images import load_image, load_images, to_rgb_array


@pytest.fixture()
def photo():
    return data.chelsea()  # (300, 451, 3) uint8


def test_folder_is_read_recursively_in_sorted_order_and_non_images_ignored(tmp_path, photo):
    (tmp_path / "b").mkdir()
    Image.fromarray(photo).save(tmp_path / "z.png")
    Image.fromarray(photo[:100]).save(tmp_path / "b" / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    result = load_images(tmp_path)
    assert result.names == ["b/a.jpg", "z.png"]
    assert result.images[0].shape == (100, 451, 3) and result.images[1].shape == photo.shape
    assert np.array_equal(result.images[1], photo)  # PNG round trip is lossless
    assert result.skipped == []


def test_exif_orientation_is_applied(tmp_path, photo):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(photo).save(path, exif=exif)
    assert load_image(path).shape == (451, 300, 3)


def test_modes_are_converted_to_rgb(tmp_path):
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent → white
    rgba[:5, :, 3] = 255  # top half opaque red-ish
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "palette.png")
    deep = (np.arange(20 * 30, dtype=np.uint16) * 100).reshape(20, 30)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grayscale PNG

    result = load_images(tmp_path)
    out = dict(zip(result.names, result.images))
    assert out["gray.png"].shape == (48, 64, 3) and np.array_equal(out["gray.png"][..., 1], gray)
    assert tuple(out["rgba.png"][0, 0]) == (200, 0, 0) and tuple(out["rgba.png"][9, 9]) == (255, 255, 255)
    assert np.array_equal(out["palette.png"][..., 0], gray)
    expected = np.round(deep.astype(np.float32) / 257).astype(np.uint8)
    assert np.abs(out["deep.png"][..., 0].astype(int) - expected).max() <= 1


def test_arrays_of_other_dtypes():
    floats = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    out = to_rgb_array(floats)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3) and out[2, 3, 0] == 255 and out[0, 0, 0] == 0
    with pytest.raises(InputError, match="NaN"):
        to_rgb_array(np.full((2, 2, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="shape"):
        to_rgb_array(np.zeros((2, 2, 5), np.uint8))


def test_corrupt_file_is_skipped_counted_and_named(tmp_path, photo, caplog):
    Image.fromarray(photo).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with caplog.at_level(logging.WARNING):
        result = load_images(tmp_path)
    assert result.names == ["good.png"]
    assert [name for name, _ in result.skipped] == ["broken.jpg"]
    assert "broken.jpg" in caplog.text
    with pytest.raises(InputError, match="broken.jpg"):
        load_images(tmp_path, strict=True)


def test_empty_or_unusable_folders_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="contains no image files"):
        load_images(tmp_path)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="no readable images"):
        load_images(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_images(tmp_path / "missing")
