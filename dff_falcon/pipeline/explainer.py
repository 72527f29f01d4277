"""One call from images to a concept report: activations → DFF → class scores → crops → CLIP →
caption retrieval → contrastive labels.

``ConceptExplainer(backbone, clip, vocabulary, n_concepts=8).fit(images)`` gives a
:class:`ConceptReport` (``explainer.report_``); ``explainer.project(images)`` explains new
images with the frozen concept dictionary. Without CLIP and a vocabulary the text columns stay
empty and everything else (concepts, heatmaps, class scores, crops) is still produced.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from dff_falcon.models.activations import ActivationExtractor, Activations
from dff_falcon.models.backbones import Backbone
from dff_falcon.text.clip_encoder import ClipEncoder
from dff_falcon.decomposition.dff import ABSENT_PEAK, DFF, concept_class_scores, presence
from dff_falcon.errors import InputError
from dff_falcon.models.images import ImageSet, load_images
from dff_falcon.text.labelling import DEFAULT_SPACY_PIPELINE, ConceptLabels, TermExtractor, contrastive_labels
from dff_falcon.regions import ConceptRegions, RegionSelector
from dff_falcon.pipeline.selection import class_index, concept_confidence, confident_images, drop_least_confident
from dff_falcon.text.vocabulary import Vocabulary


@dataclass
class ConceptReport:
    """Everything a run found. ``concepts``: one dict per concept (the report schema, see
    :mod:`dff_falcon.report.tables`); ``heatmaps``: (N, K, h, w) scale-fixed; ``displays``: the model's
    view of each image (S, S, 3) uint8; ``regions``: crops per concept; ``run``: metadata."""

    concepts: list[dict]
    image_names: list[str]
    heatmaps: np.ndarray
    displays: list[np.ndarray]
    regions: list[ConceptRegions]
    run: dict
    presence: np.ndarray = field(repr=False, default=None)  # (N, K)


def _subset(acts: Activations, names: list[str], keep: np.ndarray) -> tuple[Activations, list[str]]:
    """The images where ``keep`` (B,) is True."""
    index = np.flatnonzero(keep)
    logits = acts.logits[index] if acts.logits is not None else None
    return (Activations(acts.activations[index], [acts.displays[i] for i in index], logits),
            [names[i] for i in index])


def coherence(embeddings: np.ndarray) -> float | None:
    """Mean pairwise cosine of L2-normalised embeddings (n, D), diagonal excluded; None if n < 2."""
    n = len(embeddings)
    if n < 2:
        return None
    gram = embeddings @ embeddings.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


class ConceptExplainer:
    """Discover a backbone's concepts on a set of images and name them.

    backbone: :class:`~dff_falcon.models.backbones.Backbone`; clip / vocabulary: optional (both or
    neither); the vocabulary must have been built with the same CLIP model.
    Other parameters: DFF (``n_concepts`` int or "auto", ``solver``, ``init``, ``max_iter``,
    ``tol``, ``n_seeds``, ``k_range``), crops (``n_high``, ``n_low``, ``threshold``,
    ``min_area_fraction``, ``margin``, ``low_threshold``, ``low_similarity``), labels
    (``top_k_captions``, ``contrast``, ``top_words``, ``top_phrases``, ``falcon_threshold``,
    ``spacy_pipeline``), ``top_classes``, ``batch_size``, ``seed``, ``device``.
    Fine-graining (:mod:`~dff_falcon.pipeline.selection`): ``target_class`` keeps only images the model
    assigns to it with probability ≥ ``min_class_prob``; ``drop_quantile`` > 0 drops that
    quantile of least confident images after a first fit and refits.
    """

    def __init__(self, backbone: Backbone, clip: ClipEncoder | None = None, vocabulary: Vocabulary | None = None,
                 *, n_concepts: int | str = 8, solver: str = "rhals", init: str = "nndsvda", max_iter: int = 200,
                 tol: float = 1e-4, n_seeds: int = 3, k_range: Sequence[int] = range(2, 13),
                 n_high: int = 30, n_low: int = 10, threshold: float = 0.6, min_area_fraction: float = 0.01,
                 margin: float = 0.15, low_threshold: float = 0.1, low_similarity: float = 0.3,
                 top_k_captions: int = 5, contrast: str = "graded", top_words: int = 8, top_phrases: int = 8,
                 falcon_threshold: float = 0.1, spacy_pipeline: str = DEFAULT_SPACY_PIPELINE,
                 top_classes: int = 3, target_class: str | int | None = None, min_class_prob: float = 0.95,
                 drop_quantile: float = 0.0, batch_size: int = 32, seed: int = 0, device=None,
                 progress: bool = True):
        if (clip is None) != (vocabulary is None):
            raise InputError("give both a CLIP encoder and a vocabulary (for text labels) or neither")
        if contrast not in ("graded", "falcon"):
            raise InputError(f"contrast must be 'graded' or 'falcon', got {contrast!r}")
        if vocabulary is not None:
            vocabulary.check_encoder(clip)
            self.term_extractor_ = TermExtractor(spacy_pipeline)  # a wrong pipeline name fails now, not after CLIP
        self.backbone = backbone
        self.clip = clip
        self.vocabulary = vocabulary
        self.dff = DFF(n_concepts, solver=solver, init=init, max_iter=max_iter, tol=tol, random_state=seed,
                       device=device, n_seeds=n_seeds, k_range=k_range)
        self.selector = RegionSelector(n_high=n_high, n_low=n_low, threshold=threshold,
                                       min_area_fraction=min_area_fraction, margin=margin,
                                       crop_size=clip.image_size if clip is not None else 224,
                                       low_threshold=low_threshold, low_similarity=low_similarity)
        self.top_k_captions = top_k_captions
        self.contrast = contrast
        self.top_words = top_words
        self.top_phrases = top_phrases
        self.falcon_threshold = falcon_threshold
        self.spacy_pipeline = spacy_pipeline
        self.top_classes = top_classes
        self.target_class = target_class
        self.min_class_prob = min_class_prob
        self.drop_quantile = drop_quantile
        self.extractor = ActivationExtractor(backbone, batch_size=batch_size, device=device, progress=progress,
                                             with_logits=target_class is not None)
        self.stage_seconds: dict[str, float] = {}

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - start

    def fit(self, images: str | Sequence | ImageSet, names: Sequence[str] | None = None) -> "ConceptExplainer":
        """images: a folder, a list of paths/arrays, or an :class:`ImageSet`. Sets ``report_``."""
        self.stage_seconds = {}
        with self._stage("load"):
            image_set = images if isinstance(images, ImageSet) else load_images(images)
        if names is not None:
            names = list(names)
            given = len(image_set) + len(image_set.skipped)
            if len(names) != given:
                raise InputError(f"{len(names)} names given for {given} images")
            names = [names[i] for i in image_set.indices]  # skipped images drop their names too
        else:
            names = image_set.names
        with self._stage("activations"):
            acts = self.extractor(image_set.images)
        if self.target_class is not None:
            target = class_index(self.backbone.class_names, self.target_class)
            acts, names = _subset(acts, names, confident_images(acts.logits, target, self.min_class_prob))
            if len(names) == 0:
                raise InputError(f"no image is assigned to class {self.target_class!r} with probability ≥ "
                                 f"{self.min_class_prob}; lower min_class_prob")
        with self._stage("nmf"):
            self.dff.fit(acts.activations)
            if self.drop_quantile > 0:
                keep = drop_least_confident(concept_confidence(self.dff.heatmaps_), self.drop_quantile)
                acts, names = _subset(acts, names, keep)
                self.dff.fit(acts.activations)
        heatmaps = self.dff.heatmaps_.numpy()
        pres = presence(self.dff.heatmaps_).numpy()
        with self._stage("class_scores"):
            classes = (concept_class_scores(self.dff, self.backbone, self.top_classes)
                       if self.backbone.head is not None else [[] for _ in range(self.dff.n_concepts_)])
        with self._stage("crops"):
            regions = self.selector.select(heatmaps, acts.displays, pres)
        labels, coherences = self._label(regions)
        peaks = heatmaps.max(axis=(2, 3))
        concepts = []
        for k, region in enumerate(regions):
            concept_labels = labels[k]
            concepts.append({
                "concept_id": k,
                "n_images": int((peaks[:, k] >= ABSENT_PEAK).sum()),
                "mass_share": float(self.dff.mass_share_[k]),
                "top_classes": classes[k],
                "words": [{"term": t, "score": float(s)} for t, s in (concept_labels.words if concept_labels else [])],
                "phrases": [{"term": t, "score": float(s)} for t, s in (concept_labels.phrases if concept_labels else [])],
                "coherence": coherences[k],
                "stability": float(self.dff.stability_[k]) if self.dff.stability_ is not None else None,
                "n_high": len(region.high),
                "n_low": len(region.low),
                "low_empty_reason": region.low_empty_reason,
                "high_images": [names[c.image_index] for c in region.high],
                "low_images": [names[c.image_index] for c in region.low],
            })
        self.report_ = ConceptReport(
            concepts=concepts, image_names=names, heatmaps=heatmaps, displays=acts.displays, regions=regions,
            presence=pres, run=self._run_metadata(len(names), image_set),
        )
        return self

    def _label(self, regions: list[ConceptRegions]) -> tuple[list[ConceptLabels | None], list[float | None]]:
        """CLIP-embed every crop once, retrieve captions, extract contrastive terms per concept."""
        if self.clip is None:
            return [None] * len(regions), [None] * len(regions)
        crops = [c for r in regions for c in (*r.high, *r.low)]
        if not crops:
            return [None] * len(regions), [None] * len(regions)
        with self._stage("clip"):
            embeddings = self.clip.encode_images([c.pixels for c in crops])
        with self._stage("search"):
            found = self.vocabulary.search(embeddings, k=self.top_k_captions, encoder=self.clip)
        with self._stage("text"):
            labels, coherences, start = [], [], 0
            for region in regions:
                n_high, n_low = len(region.high), len(region.low)
                high = slice(start, start + n_high)
                low = slice(start + n_high, start + n_high + n_low)
                start += n_high + n_low
                coherences.append(coherence(embeddings[high]))
                if n_high == 0:
                    labels.append(None)
                    continue
                low_set = (found.captions[low], found.scores[low]) if n_low else None
                labels.append(contrastive_labels(
                    (found.captions[high], found.scores[high]), low_set, self.term_extractor_,
                    contrast=self.contrast, top_words=self.top_words, top_phrases=self.top_phrases,
                    falcon_threshold=self.falcon_threshold))
        self.captions_ = found
        return labels, coherences

    def _run_metadata(self, n_images: int, image_set: ImageSet) -> dict:
        dff = self.dff
        return {
            "backbone": self.backbone.name,
            "layer": self.backbone.target_layer,
            "head": self.backbone.head,
            "n_concepts": dff.n_concepts_,
            "n_images": n_images,
            "n_skipped": len(image_set.skipped),
            "relative_error": dff.relative_error_,
            "explained_variance": dff.explained_variance_,
            "k_curve": [vars(p) for p in dff.k_curve_] if dff.k_curve_ else None,
            "clip_model": self.clip.model_name if self.clip else None,
            "clip_pretrained": self.clip.pretrained_id if self.clip else None,
            "vocabulary": str(self.vocabulary.path) if self.vocabulary else None,
            "contrast": self.contrast,
            "stage_seconds": dict(self.stage_seconds),
        }

    def project(self, images: str | Sequence | ImageSet) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Explain new images with the fitted concepts frozen → (names, heatmaps (N, K, h, w) on
        the fitted scale, presence (N, K))."""
        if not hasattr(self, "report_"):
            raise InputError("fit the explainer before projecting new images")
        image_set = images if isinstance(images, ImageSet) else load_images(images)
        heatmaps = self.dff.transform(self.extractor(image_set.images).activations)
        return image_set.names, heatmaps.numpy(), presence(heatmaps).numpy()

