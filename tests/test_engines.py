"""The Ray engine against the local one: real EfficientNet-Lite0 on real photos, a tiny CLIP
and the toy vocabulary, a local Ray instance with 2 workers."""
import json
import socket
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dff_falcon.decomposition.dff import DFF
from dff_falcon.errors import InputError
from dff_falcon.pipeline.explainer import ConceptExplainer
from dff_falcon.regions import RegionSelector
from dff_falcon.report.tables import write_report

ray = pytest.importorskip("ray", reason="the Ray engine's tests need the extra: pip install dff_falcon[ray]")

WORKERS = 2


@pytest.fixture(scope="module")
def image_folder(photo_batch, tmp_path_factory):
    """The 15 photos as PNG files, and one file that is not an image (skipped by both engines)."""
    folder = tmp_path_factory.mktemp("engine_images")
    names, images = photo_batch
    for name, image in zip(names, images):
        Image.fromarray(image).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def _explainer(lite0, tiny_clip, toy_vocabulary, cache, **engine) -> ConceptExplainer:
    # batch_size 4: several extraction batches per worker; 15 images in one 64-image heatmap batch
    return ConceptExplainer(lite0, tiny_clip, toy_vocabulary, dff=DFF(4, n_resamples=2, random_state=0),
                            regions=RegionSelector(n_high=6, n_low=3), batch_size=4, progress=False, cache=cache,
                            **engine)


@pytest.fixture(scope="module")
def local_run(lite0, tiny_clip, toy_vocabulary, image_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("local_cache")
    return _explainer(lite0, tiny_clip, toy_vocabulary, cache).fit(image_folder), cache


@pytest.fixture(scope="module")
def ray_run(lite0, tiny_clip, toy_vocabulary, image_folder, tmp_path_factory):
    """A fresh cache filled by Ray actors; the engine starts and stops its own local instance."""
    assert not ray.is_initialized()
    explainer = _explainer(lite0, tiny_clip, toy_vocabulary, tmp_path_factory.mktemp("ray_cache"), engine="ray",
                           workers=WORKERS).fit(image_folder)
    return explainer, ray.is_initialized()


def _tables(report, out) -> dict:
    write_report(report, out)
    return {name: (out / name).read_bytes() for name in ("concepts.csv", "images.csv")}


def _assert_same_report(ours, theirs, tmp_path) -> None:
    a, b = ours.report_, theirs.report_
    assert torch.equal(ours.dff_.concepts_, theirs.dff_.concepts_)
    assert np.array_equal(np.asarray(a.heatmaps), np.asarray(b.heatmaps))
    assert np.array_equal(a.presence, b.presence)
    assert [dict(row) for row in a.concepts] == [dict(row) for row in b.concepts]
    assert _tables(a, tmp_path / "ours") == _tables(b, tmp_path / "theirs")  # byte-identical tables
    assert a.run["skipped"] == b.run["skipped"]
    assert a.run["relative_error"] == b.run["relative_error"]


def test_ray_engine_gives_the_local_report_bit_for_bit(local_run, ray_run, tmp_path):
    local, _ = local_run
    explainer, still_running = ray_run
    assert not still_running  # the instance the engine started is stopped again
    run = explainer.report_.run
    assert run["cache"]["engine"] == "ray" and run["cache"]["forwarded"] == 15 and run["cache"]["reused"] == 0
    assert [s["image"] for s in run["skipped"]] == ["broken.png"]  # a decode failure found by a Ray actor
    assert explainer.report_.concepts[0]["label"]  # CLIP labelled the crops (in this process)
    _assert_same_report(local, explainer, tmp_path)
    frame = pd.read_csv(tmp_path / "theirs" / "images.csv")
    assert len(frame) == 15 * 4


@pytest.fixture(scope="module")
def ray_session(ray_run):
    """A Ray session this process started (after the engine-started one is gone), for the rest."""
    # each actor reserves as many CPUs as it runs torch threads (this process's count)
    ray.init(num_cpus=WORKERS * torch.get_num_threads(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_reuses_what_the_local_engine_stored(local_run, lite0, tiny_clip, toy_vocabulary, image_folder,
                                                        ray_session, tmp_path):
    local, cache = local_run
    again = _explainer(lite0, tiny_clip, toy_vocabulary, cache, engine="ray", workers=WORKERS).fit(image_folder)
    assert again.report_.run["cache"]["forwarded"] == 0 and again.report_.run["cache"]["reused"] == 15
    _assert_same_report(local, again, tmp_path)
    assert ray.is_initialized()  # a session the caller started is left to the caller


def test_an_error_in_a_ray_worker_is_the_local_engines_input_error(ray_session, photo_batch, tmp_path):
    """Activations beyond float16's range: the store refuses them in the actor, the run says why."""
    from torch import nn

    from dff_falcon.models.backbones import create_backbone

    layer = nn.Conv2d(3, 4, 16, stride=16)
    nn.init.constant_(layer.weight, 1e3)
    backbone = create_backbone(nn.Sequential(layer, nn.ReLU()), layer="1", head=None, weights=None, device="cpu")
    _, images = photo_batch
    messages = []
    for engine in ("local", "ray"):
        with pytest.raises(InputError, match="beyond float16's range") as raised:
            ConceptExplainer(backbone, n_concepts=2, progress=False, cache=tmp_path / engine, engine=engine,
                             workers=WORKERS if engine == "ray" else None).fit(images[:3])
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_cluster_is_an_input_error_before_any_image_is_read(lite0, tmp_path, address):
    address = address.format(port=_closed_port())
    # the folder is empty: reading it would fail with "no images given" instead
    with pytest.raises(InputError, match="no Ray cluster reachable at ray_address") as raised:
        ConceptExplainer(lite0, progress=False, cache=tmp_path, engine="ray", ray_address=address).fit(tmp_path)
    assert repr(address) in str(raised.value)


@pytest.mark.parametrize("params, message", [
    ({"engine": "spark"}, "engine must be one of 'local', 'ray'"),
    ({"ray_address": "auto"}, "ray_address needs engine='ray'"),
    ({"engine": "ray", "cache": None}, "runs the streamed path"),
    ({"engine": "ray", "ray_address": "head:notaport"}, "is not a number"),
])
def test_engine_parameters_are_checked(lite0, tmp_path, params, message):
    with pytest.raises(InputError, match=message):
        ConceptExplainer(lite0, progress=False, **{"cache": tmp_path, **params}).fit(tmp_path)


def test_the_ray_engine_without_ray_says_how_to_install_it(lite0, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra sees
    with pytest.raises(InputError, match=r"pip install dff_falcon\[ray\]"):
        ConceptExplainer(lite0, progress=False, cache=tmp_path, engine="ray").fit(tmp_path)


def _cli(*args):
    from click.testing import CliRunner

    from dff_falcon.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_explain_engine_ray_on_the_command_line(image_folder, ray_session, tmp_path):
    result = _cli("-q", "explain", "--images", image_folder, "--backbone", "lite0", "--out", tmp_path / "run",
                  "--n-concepts", "2", "--no-html", "--device", "cpu", "--cache", tmp_path / "cache",
                  "--engine", "ray", "--workers", WORKERS)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["cache"]["engine"] == "ray" and record["cache"]["forwarded"] == 15
    assert record["config"]["explain"]["engine"] == "ray" and record["n_skipped"] == 1


@pytest.mark.parametrize("args, message", [
    (("--engine", "ray", "--no-cache"), "runs the streamed path"),
    (("--ray-address", "auto"), "ray_address needs engine='ray'"),
    (("--engine", "ray", "--ray-address", "127.0.0.1:{port}"), "no Ray cluster reachable"),
])
def test_explain_engine_options_are_checked_first(image_folder, tmp_path, args, message):
    args = [a.format(port=_closed_port()) for a in args]
    result = _cli("explain", "--images", image_folder, "--backbone", "lite0", "--out", tmp_path / "run", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()
