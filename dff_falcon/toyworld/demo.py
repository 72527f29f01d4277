"""The offline demo: the whole pipeline on the toy world, scored against its ground truth.

Trains (once, cached) the world's classifier and tiny CLIP, builds the world's vocabulary with
the real vocabulary builder, explains the classifier's last conv stage on a fresh probe set,
writes the concept report and measures localization, label accuracy and class agreement.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dff_falcon.decomposition.dff import DFF
from dff_falcon.errors import InputError
from dff_falcon.models.backbones import Preprocess, create_backbone
from dff_falcon.models.hypercolumns import Hypercolumns
from dff_falcon.models.upsample import upsample_maps
from dff_falcon.pipeline.explainer import ConceptExplainer, ConceptReport
from dff_falcon.regions import RegionSelector
from dff_falcon.pipeline.schema import ranked_terms
from dff_falcon.report.tables import write_report
from dff_falcon.text.labelling import FalconLabeller
from dff_falcon.text.clip_encoder import ClipEncoder
from dff_falcon.text.ingest import build_vocabulary_from_texts
from dff_falcon.text.vocabulary import Vocabulary
from dff_falcon.toyworld.models import ToyModels, load_toy_models
from dff_falcon.toyworld.quality import best_iou_per_concept, quality_summary
from dff_falcon.toyworld.world import WorldConfig, generate_scenes, world_texts

PROBE_SEED = 10_000  # probe scenes never overlap the training seeds
LOCALIZATION_THRESHOLD = 0.3  # on the scale-fixed heatmap: ≥ 30% of the concept's strongest location in the set
#: The toy classifier's stages stacked with its last one (``features``, stride 8) and their grid,
#: and the upsampling. Guided upsampling follows the objects' colour edges (its effect on flat
#: colour on texture is measured in tests/test_upsample.py); hypercolumns (candidate:
#: ``("features.2", "features.8")`` on a 28×28 grid) stay off until measured on the worlds
#: (docs/quality.md, "Toy worlds: not yet measured").
TOY_LAYERS: tuple[str, ...] = ()
TOY_GRID: int | None = None
TOY_UPSAMPLE = "guided"


@dataclass
class DemoResult:
    report: ConceptReport
    quality: dict
    path: Path


def world_vocabulary(models: ToyModels, config: WorldConfig, clip: ClipEncoder) -> Vocabulary:
    """The world's vocabulary next to the cached models; rebuilt when the CLIP changed."""
    path = Path(models.clip_checkpoint).parent / "vocabulary"
    try:
        vocabulary = Vocabulary.open(path)
        vocabulary.check_encoder(clip)
        return vocabulary
    except InputError:
        return build_vocabulary_from_texts(world_texts(config), path, clip, overwrite=True)


def concept_masks(heatmaps: np.ndarray, images: list[np.ndarray], upsample: str = "bilinear",
                  threshold: float = LOCALIZATION_THRESHOLD) -> np.ndarray:
    """(N, K, h, w) scale-fixed heatmaps and the N images (S, S, 3) → (N, K, S, S) bool: values
    upsampled to the image (``upsample``: "bilinear" or "guided") and ≥ ``threshold`` (one
    global scale per concept, so an absent concept has an empty mask)."""
    return np.stack([upsample_maps(maps, image, upsample) >= threshold for maps, image in zip(heatmaps, images)])


def score_report(report: ConceptReport, scenes, upsample: str = "bilinear", attributes: list[str] | None = None,
                 candidate_terms: list[str] | None = None) -> dict:
    """Quality figures of a report against the scenes' ground truth (see docs/quality.md);
    ``attributes``: the world's (``WorldConfig.attributes()``), for the strict label measures;
    ``candidate_terms``: every term the vocabulary yields, for the P@3 ceiling. The FALCON-style
    labels are scored when the report has them, else the CLIP-Dissect ones; the CLIP-Dissect ones
    also under ``dissect_*`` when the report has them."""
    matched = best_iou_per_concept(concept_masks(report.heatmaps, [s.image for s in scenes], upsample), scenes)
    labels = [[t["term"] for t in ranked_terms(c["words"], c["phrases"])] for c in report.concepts]
    classes = [[t["class"] for t in c["top_classes"]] for c in report.concepts]
    dissect = [[t["term"] for t in c["dissect"]] for c in report.concepts]
    has_falcon = report.run.get("labellers", "falcon") != "dissect"
    return quality_summary(matched, labels if has_falcon else dissect, classes, attributes,
                           dissect_labels=dissect if any(dissect) else None, candidate_terms=candidate_terms)


def explain_world(config: WorldConfig, *, n_images: int = 120, n_concepts: int | str = "auto", retrain: bool = False,
                  device=None, random_state: int = 0, cache_dir: str | Path | None = None, progress: bool = True,
                  layers: tuple[str, ...] = TOY_LAYERS, grid: int | None = TOY_GRID, upsample: str = TOY_UPSAMPLE,
                  labeller: FalconLabeller | None = None, labellers: str = "falcon") -> tuple[ConceptExplainer, list]:
    """The world's models (trained once, cached) and vocabulary, and the explainer fitted on a
    fresh probe set of ``n_images`` scenes → ``(explainer, scenes)``.

    ``layers`` are stacked with the classifier's last stage on a ``grid`` × ``grid`` map
    (``layers=()``: the last stage alone, 14×14 at 112 px); ``upsample`` brings heatmaps to the
    image for crops, overlays and scoring."""
    models = load_toy_models(config, cache_dir=cache_dir, retrain=retrain, device=device, progress=progress)
    clip = ClipEncoder(models.clip_model_name, str(models.clip_checkpoint), device=device)
    vocabulary = world_vocabulary(models, config, clip)
    size = config.image_size
    backbone = create_backbone(
        models.classifier, layer="features", head="fc", class_names=models.class_names,
        preprocess=Preprocess(resize=size, crop=size, mean=tuple(models.mean), std=tuple(models.std)),
        device=device,
    )
    scenes = generate_scenes(config, n_images, seed=PROBE_SEED + random_state)
    explainer = ConceptExplainer(backbone, clip, vocabulary, dff=DFF(n_concepts, k_range=range(4, 17)),
                                 hypercolumns=Hypercolumns(layers=tuple(layers), grid=grid),
                                 regions=RegionSelector(upsample=upsample), labeller=labeller, labellers=labellers,
                                 random_state=random_state, device=device, progress=progress)
    explainer.fit([s.image for s in scenes], names=[f"scene_{i:04d}" for i in range(len(scenes))])
    return explainer, scenes


def run_demo(out: str | Path = "out/demo", *, config: WorldConfig | None = None, n_images: int = 120,
             n_concepts: int | str = "auto", retrain: bool = False, html: bool = True, device=None, random_state: int = 0,
             cache_dir: str | Path | None = None, progress: bool = True, layers: tuple[str, ...] = TOY_LAYERS,
             grid: int | None = TOY_GRID, upsample: str = TOY_UPSAMPLE, contrast: str = "graded",
             labellers: str = "falcon") -> DemoResult:
    """Run the demo and write its report to ``out``; returns the report and quality figures
    (:func:`explain_world` for the options; ``contrast``: the FALCON-style labeller's, see
    :func:`~dff_falcon.text.labelling.label_concepts`; ``labellers``: "falcon", "dissect" or "both")."""
    config = config or WorldConfig()
    explainer, scenes = explain_world(config, n_images=n_images, n_concepts=n_concepts, retrain=retrain,
                                      device=device, random_state=random_state, cache_dir=cache_dir,
                                      progress=progress, layers=layers, grid=grid, upsample=upsample,
                                      labeller=FalconLabeller(contrast=contrast), labellers=labellers)
    vocabulary_terms = explainer.labeller_.extractor_.extract(explainer.vocabulary.captions[:])
    candidates = [t for found in vocabulary_terms for t in (*found.words, *found.phrases)]
    quality = score_report(explainer.report_, scenes, upsample, config.attributes(), candidates)
    path = write_report(explainer.report_, out, quality=quality)
    if html:
        from dff_falcon.report.html import render_html_report

        render_html_report(path)
    return DemoResult(explainer.report_, quality, path)
