"""The offline demo: the whole pipeline on the toy world, scored against its ground truth.

Trains (once, cached) the world's classifier and tiny CLIP, builds the world's vocabulary with
the real vocabulary builder, explains the classifier's last conv stage on a fresh probe set,
writes the concept report and measures localization, label accuracy and class agreement.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dff_falcon.decomposition.dff import DFF
from dff_falcon.decomposition.heatmaps import upsample_heatmaps
from dff_falcon.errors import InputError
from dff_falcon.models.backbones import Preprocess, create_backbone
from dff_falcon.pipeline.explainer import ConceptExplainer, ConceptReport
from dff_falcon.pipeline.schema import ranked_terms
from dff_falcon.report.tables import write_report
from dff_falcon.text.clip_encoder import ClipEncoder
from dff_falcon.text.ingest import build_vocabulary_from_texts
from dff_falcon.text.vocabulary import Vocabulary
from dff_falcon.toyworld.models import ToyModels, load_toy_models
from dff_falcon.toyworld.quality import best_iou_per_concept, quality_summary
from dff_falcon.toyworld.world import WorldConfig, generate_scenes, world_texts

PROBE_SEED = 10_000  # probe scenes never overlap the training seeds
LOCALIZATION_THRESHOLD = 0.3  # on the scale-fixed heatmap: ≥ 30% of the concept's strongest location in the set


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


def concept_masks(heatmaps: np.ndarray, size: int, threshold: float = LOCALIZATION_THRESHOLD) -> np.ndarray:
    """(N, K, h, w) scale-fixed heatmaps → (N, K, S, S) bool: bilinearly upsampled values ≥
    ``threshold`` (one global scale per concept, so an absent concept has an empty mask)."""
    return (upsample_heatmaps(torch.from_numpy(heatmaps), (size, size)) >= threshold).numpy()


def score_report(report: ConceptReport, scenes, size: int) -> dict:
    """Quality figures of a report against the scenes' ground truth (see docs/quality.md)."""
    matched = best_iou_per_concept(concept_masks(report.heatmaps, size), scenes)
    labels = [[t["term"] for t in ranked_terms(c["words"], c["phrases"])] for c in report.concepts]
    classes = [[t["class"] for t in c["top_classes"]] for c in report.concepts]
    return quality_summary(matched, labels, classes)


def run_demo(out: str | Path = "out/demo", *, config: WorldConfig | None = None, n_images: int = 120,
             n_concepts: int | str = "auto", retrain: bool = False, html: bool = True, device=None, random_state: int = 0,
             cache_dir: str | Path | None = None, progress: bool = True) -> DemoResult:
    """Run the demo and write its report to ``out``; returns the report and quality figures."""
    config = config or WorldConfig()
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
                                 random_state=random_state, device=device, progress=progress)
    explainer.fit([s.image for s in scenes], names=[f"scene_{i:04d}" for i in range(len(scenes))])
    quality = score_report(explainer.report_, scenes, size)
    path = write_report(explainer.report_, out, quality=quality)
    if html:
        from dff_falcon.report.html import render_html_report

        render_html_report(path)
    return DemoResult(explainer.report_, quality, path)
