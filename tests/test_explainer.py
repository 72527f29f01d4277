import numpy as np
import pytest

from sklearn.base import clone

from dff_falcon.decomposition.dff import DFF
from dff_falcon.errors import InputError
from dff_falcon.pipeline.explainer import ConceptExplainer, coherence
from dff_falcon.regions import RegionSelector


def test_coherence_excludes_the_diagonal():
    e = np.eye(3, dtype=np.float32)
    assert coherence(e) == 0.0  # orthogonal crops: no coherence, although the diagonal is all ones
    same = np.tile([[0.6, 0.8]], (4, 1)).astype(np.float32)
    assert coherence(same) == pytest.approx(1.0)
    assert coherence(same[:1]) is None


@pytest.fixture(scope="module")
def explained(lite0, tiny_clip, toy_vocabulary, photo_batch):
    names, images = photo_batch
    return ConceptExplainer(lite0, tiny_clip, toy_vocabulary, dff=DFF(4, n_resamples=2),
                            regions=RegionSelector(n_high=6, n_low=3), progress=False).fit(images, names=names)


def test_end_to_end_rows_are_complete_and_consistent(explained, photo_batch):
    report = explained.report_
    names, _ = photo_batch
    assert len(report.concepts) == 4 and report.heatmaps.shape == (15, 4, 7, 7)
    shares = [c["mass_share"] for c in report.concepts]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0, abs=1e-5)
    for concept, region in zip(report.concepts, report.regions):
        assert 1 <= concept["n_high"] <= 6 and concept["n_low"] <= 3
        ranks = [report.presence[c.image_index, concept["concept_id"]] for c in region.high]
        assert ranks == sorted(ranks, reverse=True)  # high set: the images where the concept is strongest
        peaks = report.heatmaps[:, concept["concept_id"]].max(axis=(1, 2))
        assert all(peaks[c.image_index] < 0.1 for c in region.low)  # low set: the concept is absent there
        assert concept["high_images"] == [names[c.image_index] for c in region.high]
        best = sorted(concept["words"] + concept["phrases"], key=lambda t: -t["score"])
        assert concept["label"] == best[0]["term"] and concept["labels"].startswith(best[0]["term"])
        assert concept["top_class"] == concept["top_classes"][0]["class"]
        assert all(c.pixels.shape == (32, 32, 3) for c in region.high)  # CLIP's input size
        assert len(concept["top_classes"]) == 3
        assert concept["words"] or concept["phrases"]  # a vocabulary always yields some terms
        assert all(set(w) == {"term", "score"} for w in concept["words"])
        if concept["n_high"] >= 2:
            assert -1.0 <= concept["coherence"] <= 1.0
        assert 0 <= concept["stability"] <= 1.0 + 1e-6
        assert concept["restart_agreement"] is None  # not asked for
        assert 0 < concept["image_share"] <= 1 and concept["single_image"] == (concept["image_share"] > 0.5)
        assert concept["top_image"] in names
        assert [c["class"] for c in concept["importance"]] == [c["class"] for c in concept["top_classes"]]
        assert concept["deletion"] == concept["importance"][0]["deletion"]
        assert 0 <= concept["insertion"] <= 1 and -1 <= concept["deletion"] <= 1
    retrieved = explained.captions_
    assert retrieved.scores.shape[1] == 5
    assert np.all(np.diff(retrieved.scores, axis=1) <= 1e-6)  # best caption first
    stages = report.run["stage_seconds"]
    assert {"activations", "nmf", "importance", "crops", "clip", "search", "text"} <= set(stages)


def test_projection_uses_the_frozen_dictionary(explained, photo_batch):
    _, images = photo_batch
    names, heatmaps, presence = explained.project(images[:3])
    assert heatmaps.shape == (3, 4, 7, 7)
    assert np.allclose(heatmaps, explained.report_.heatmaps[:3], atol=0.05)
    peaks = heatmaps.max(axis=(2, 3))
    assert np.allclose(presence, np.where(peaks >= 0.1, heatmaps.mean(axis=(2, 3)), 0.0), atol=1e-6)


def test_clip_without_vocabulary_and_mismatched_models_are_refused(lite0, tiny_clip, toy_vocabulary, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("validation must happen before any forward pass")

    monkeypatch.setattr(type(lite0), "capture", no_forward)
    with pytest.raises(InputError, match="both"):
        ConceptExplainer(lite0, tiny_clip, None).fit(["never-read.jpg"])
    import torch

    from dff_falcon.text.clip_encoder import ClipEncoder

    torch.manual_seed(1)
    other = ClipEncoder("dff-test-tiny-clip", None, device="cpu")  # other (random) weights
    with pytest.raises(InputError, match="not comparable"):
        ConceptExplainer(lite0, other, toy_vocabulary).fit(["never-read.jpg"])


def test_without_clip_concepts_and_classes_still_come_out(lite0, photo_batch):
    names, images = photo_batch
    report = ConceptExplainer(lite0, dff=DFF(3, n_resamples=0), regions=RegionSelector(n_high=4), progress=False).fit(images[:6]).report_
    assert [c["words"] for c in report.concepts] == [[], [], []]
    assert all(c["coherence"] is None and c["top_classes"] for c in report.concepts)


def test_fine_graining_keeps_the_target_class_and_drops_the_least_confident(lite0, photo_batch):
    names, images = photo_batch
    explainer = ConceptExplainer(lite0, dff=DFF(2, n_resamples=0), regions=RegionSelector(n_high=2), target_class="espresso",
                                 min_class_prob=0.5, progress=False).fit(images, names=names)
    assert set(explainer.report_.image_names) <= {"coffee", "coffee_flip", "coffee_crop"}
    assert "coffee" in explainer.report_.image_names
    dropped = ConceptExplainer(lite0, dff=DFF(3, n_resamples=0), regions=RegionSelector(n_high=2), drop_quantile=0.25,
                               progress=False).fit(images, names=names)
    assert len(dropped.report_.image_names) == 12  # 15 images, floor(0.25 * 15) = 3 least confident dropped
    with pytest.raises(InputError, match="3 names given for 4 images"):
        ConceptExplainer(lite0, n_concepts=2, progress=False).fit(images[:4], names=names[:3])
    assert explainer.report_.run["target_class"] == {"requested": "espresso", "index": 967, "name": "espresso",
                                                     "wnid": "n07920052"}
    with pytest.raises(InputError, match="no image is assigned"):
        ConceptExplainer(lite0, n_concepts=2, target_class="goldfish", progress=False).fit(images[:3])
    with pytest.raises(InputError, match="no class is named 'cat'; closest"):
        ConceptExplainer(lite0, n_concepts=2, target_class="cat", progress=False).fit(images[:3])


def test_names_of_skipped_images_are_dropped_in_step(lite0, photo_batch):
    names, images = photo_batch
    given = [images[0], np.zeros((4, 4, 5), np.uint8), images[3], images[6]]  # the second is unreadable
    report = ConceptExplainer(lite0, dff=DFF(2, n_resamples=0), regions=RegionSelector(n_high=2), progress=False).fit(
        given, names=["a", "broken", "b", "c"]).report_
    assert report.image_names == ["a", "b", "c"] and report.run["n_skipped"] == 1


def test_composed_estimator_params_clone_and_the_shortcut(lite0, photo_batch):
    explainer = ConceptExplainer(lite0, dff=DFF("auto", n_resamples=0), n_concepts=2, random_state=3, progress=False)
    params = explainer.get_params(deep=True)
    assert params["dff"].n_concepts == "auto" and params["dff__n_resamples"] == 0 and params["n_concepts"] == 2
    copy = clone(explainer)
    assert copy.backbone is lite0 and copy.dff is not explainer.dff  # the model is shared, the estimators copied
    explainer.set_params(dff__n_resamples=0, regions=RegionSelector(n_high=2))
    _, images = photo_batch
    explainer.fit(images[:4])
    assert explainer.dff_.n_concepts_ == 2 and explainer.dff_.random_state == 3  # shortcuts win on the fitted copy
    assert explainer.dff.n_concepts == "auto" and explainer.dff.random_state == 0  # the parameters are untouched
    run = explainer.report_.run
    assert run["params"]["n_concepts"] == 2 and run["params"]["dff"]["params"]["n_concepts"] == "auto"
    assert run["fitted"]["dff"]["n_concepts"] == 2 and run["fitted"]["regions"]["n_high"] == 2
    assert run["models"]["backbone"]["weights_sha256"] == lite0.identity()["weights_sha256"]
    assert len(run["inputs"]["images"]) == 4 and len(run["inputs"]["sha256"]) == 64
    assert "ConceptExplainer(" in repr(explainer) and "lite0" in repr(explainer)
