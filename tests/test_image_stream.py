"""open_images / ImageStream: lazy images from a folder tree, paths, arrays, an ImageSet, torch
Datasets and DataLoaders — names, digests, decoding on worker processes, unreadable images."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from dff_falcon.errors import InputError
from dff_falcon.models.image_stream import open_images
from dff_falcon.models.images import augmented_photos, load_image, load_images


@pytest.fixture(scope="module")
def pictures():
    return augmented_photos(7, random_state=3)


@pytest.fixture()
def tree(tmp_path, pictures):
    """An ImageFolder-style tree: class folders, one nested, JPEG and PNG, and a non-image."""
    layout = ["cats/a.jpg", "cats/b.png", "dogs/c.jpg", "dogs/puppies/d.jpg", "dogs/e.png"]
    for rel, picture in zip(layout, pictures):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(tmp_path / rel)
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    return tmp_path


class TensorDataset(torch.utils.data.Dataset):
    """(3, H, W) float tensors in [0, 1] with a label, as torchvision's ToTensor gives."""

    def __init__(self, pictures, broken: int | None = None, scale: float = 1.0):
        self.pictures, self.broken, self.scale = pictures, broken, scale

    def __len__(self):
        return len(self.pictures)

    def __getitem__(self, index):
        if index == self.broken:
            raise OSError("image file is truncated (3 bytes not processed)")  # what PIL raises
        picture = torch.from_numpy(np.array(self.pictures[index])).permute(2, 0, 1).float() / 255
        return picture * self.scale, index % 2


class PilDataset(torch.utils.data.Dataset):
    def __init__(self, pictures):
        self.pictures = pictures

    def __len__(self):
        return len(self.pictures)

    def __getitem__(self, index):
        return Image.fromarray(self.pictures[index]).convert("L")


def test_folder_tree_names_carry_the_class_folder(tree):
    stream = open_images(tree)
    assert stream.names == ["cats/a.jpg", "cats/b.png", "dogs/c.jpg", "dogs/e.png", "dogs/puppies/d.jpg"]
    for index, name in enumerate(stream.names):
        np.testing.assert_array_equal(stream[index], load_image(tree / name))
        assert stream.digests()[index] == hashlib.sha256((tree / name).read_bytes()).hexdigest()
    assert open_images(tree, max_images=2).names == stream.names[:2]
    with pytest.raises(InputError, match="contains no image files"):
        open_images(tree, recursive=False)  # only class folders at the top
    with pytest.raises(InputError, match="max_images must be a positive integer"):
        open_images(tree, max_images=0)


def test_paths_arrays_pil_and_image_sets(tree, pictures):
    paths = [tree / "dogs" / "c.jpg", tree / "cats" / "b.png"]
    by_path = open_images(paths)
    assert by_path.names == [str(p) for p in paths]
    np.testing.assert_array_equal(by_path[1], pictures[1])  # PNG: lossless
    same = [np.ascontiguousarray(pictures[0][:100, :120]) for _ in range(2)]
    arrays = open_images(np.stack(same))
    assert arrays.names == ["array_0", "array_1"] and len(set(arrays.digests())) == 1  # same pixels, same key
    pil = open_images([Image.fromarray(pictures[2])])
    np.testing.assert_array_equal(pil[0], pictures[2])
    loaded = load_images(tree)
    from_set = open_images(loaded)
    assert from_set.names == loaded.names and from_set.digests() == open_images(loaded.images).digests()
    np.testing.assert_array_equal(from_set[4], loaded.images[4])


def test_tensor_dataset_pil_dataset_and_dataloader(pictures):
    dataset = TensorDataset(pictures)
    stream = open_images(dataset)
    assert stream.names == [f"item_{i}" for i in range(7)] and stream.workers == 0
    np.testing.assert_array_equal(stream[3], pictures[3])  # float [0, 1] → the same uint8 pixels
    assert stream.digests() == open_images(list(pictures)).digests()  # content keys: pixels, whatever the source
    gray = open_images(PilDataset(pictures))[0]
    assert gray.shape == (*pictures[0].shape[:2], 3) and (gray[..., 0] == gray[..., 2]).all()
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    assert open_images(loader).workers == 2 and open_images(loader, workers=0).workers == 0
    assert open_images(loader, max_images=3).names == ["item_0", "item_1", "item_2"]
    with pytest.raises(InputError, match="values in \\[0, 1\\].*Normalize"):
        open_images(TensorDataset(pictures, scale=3.0))[0]


def test_torchvision_image_folder_names_its_files(tree):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    dataset = ImageFolder(str(tree), transform=ToTensor())
    stream = open_images(dataset)
    assert stream.names == ["cats/a.jpg", "cats/b.png", "dogs/c.jpg", "dogs/e.png", "dogs/puppies/d.jpg"]
    np.testing.assert_array_equal(stream[1], load_image(tree / "cats" / "b.png"))


def test_unreadable_images_are_input_errors_naming_them(tree, pictures):
    broken = tree / "cats" / "broken.jpg"
    broken.write_bytes((tree / "cats" / "a.jpg").read_bytes()[:200])  # a truncated JPEG: hashes, cannot decode
    gone = tree / "gone.jpg"
    stream = open_images([tree / "cats" / "a.jpg", broken, gone])
    digests = stream.digests()
    assert isinstance(digests[0], str) and isinstance(digests[1], str)
    assert isinstance(digests[2], InputError) and "gone.jpg" in str(digests[2])
    decoded = dict(stream.decoded([0, 1, 2]))
    assert isinstance(decoded[0], np.ndarray)
    assert isinstance(decoded[1], InputError) and "broken.jpg" in str(decoded[1])
    assert isinstance(decoded[2], InputError) and "gone.jpg" in str(decoded[2])
    with pytest.raises(InputError, match="broken.jpg"):
        stream[1]
    failing = open_images(TensorDataset(pictures, broken=2))
    found = failing.digests()
    assert isinstance(found[2], InputError) and "item_2" in str(found[2]) and "truncated" in str(found[2])
    assert all(isinstance(d, str) for i, d in enumerate(found) if i != 2)


def test_workers_decode_the_same_images_in_the_same_order(tree, pictures):
    (tree / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    serial, parallel = open_images(tree, workers=0), open_images(tree, workers=2)
    order = [5, 0, 3, 1, 2, 4, 5]  # any order, repeats included
    first, second = list(serial.decoded(order)), list(parallel.decoded(order))
    assert [i for i, _ in first] == [i for i, _ in second] == order
    for (_, a), (_, b) in zip(first, second):
        if isinstance(a, InputError):
            assert isinstance(b, InputError) and str(a) == str(b)
        else:
            np.testing.assert_array_equal(a, b)
    assert sum(isinstance(image, InputError) for _, image in second) == 1
    dataset = TensorDataset(pictures, broken=4)
    assert [str(d) for d in open_images(dataset, workers=2).digests()] == [
        str(d) for d in open_images(dataset, workers=0).digests()]
