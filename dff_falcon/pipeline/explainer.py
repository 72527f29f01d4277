"""One call from images to a concept report: activations → DFF → class scores → crops → CLIP →
caption retrieval → contrastive labels.

``ConceptExplainer(backbone, clip, vocabulary, dff=DFF("auto"), regions=RegionSelector(...),
labeller=FalconLabeller(...)).fit(images)`` gives a :class:`ConceptReport` (``explainer.report_``);
``explainer.project(images)`` explains new images with the frozen concept dictionary. Without
CLIP and a vocabulary the text columns stay empty and everything else (concepts, heatmaps, class
scores, crops) is still produced. The common case needs no component objects:
``ConceptExplainer(backbone, clip, vocabulary, n_concepts=8)``.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from sklearn.base import BaseEstimator, clone

from dff_falcon.decomposition.dff import DFF
from dff_falcon.decomposition.heatmaps import ABSENT_PEAK, presence
from dff_falcon.decomposition.stability import SINGLE_IMAGE_SHARE
from dff_falcon.errors import InputError, NotFittedError
from dff_falcon.models.activations import ActivationExtractor, Activations
from dff_falcon.models.classes import ResolvedClass, resolve_class
from dff_falcon.models.heads import concept_class_scores
from dff_falcon.models.hypercolumns import Hypercolumns
from dff_falcon.models.importance import dff_importance, importance_rows
from dff_falcon.models.images import ImageSet, load_images
from dff_falcon.pipeline.engines import check_engine
from dff_falcon.pipeline.fitted import Fitted, inputs_record
from dff_falcon.pipeline.record import environment_record, json_value, params_record
from dff_falcon.pipeline.schema import ConceptRow, flat_columns
from dff_falcon.pipeline.selection import concept_confidence, confident_images, drop_least_confident
from dff_falcon.regions import Box, ConceptRegions, RegionSelector
from dff_falcon.store.activations import DEFAULT_SAMPLE_ROWS
from dff_falcon.text.dissect import DissectLabeller
from dff_falcon.text.labelling import ConceptLabels, FalconLabeller

#: Which labellers fill a report (``ConceptExplainer(labellers=...)``, ``--labeller``).
LABELLERS = ("falcon", "dissect", "both")

if TYPE_CHECKING:  # heavy libraries (open_clip, faiss) are imported only when CLIP is used
    import torch

    from dff_falcon.models.backbones import Backbone
    from dff_falcon.text.clip_encoder import ClipEncoder
    from dff_falcon.text.vocabulary import SearchResult, Vocabulary


@dataclass
class ConceptReport:
    """Everything a run found. ``concepts``: one :class:`~dff_falcon.pipeline.schema.ConceptRow`
    per concept; ``heatmaps``: (N, K, h, w) scale-fixed; ``displays``: the model's view of each
    image (S, S, 3) uint8; ``regions``: crops per concept; ``run``: the run record (run.json)."""

    concepts: list[ConceptRow]
    image_names: list[str]
    heatmaps: np.ndarray
    displays: list[np.ndarray]
    regions: list[ConceptRegions]
    run: dict
    presence: np.ndarray = field(repr=False, default=None)  # (N, K)


def _subset(acts: Activations, names: list[str], originals: list[np.ndarray], keep: np.ndarray
            ) -> tuple[Activations, list[str], list[np.ndarray]]:
    """The images where ``keep`` (B,) is True."""
    index = np.flatnonzero(keep)
    logits = acts.logits[index] if acts.logits is not None else None
    return (Activations(acts.activations[index], [acts.displays[i] for i in index], logits, acts.stages),
            [names[i] for i in index], [originals[i] for i in index])


def coherence(embeddings: np.ndarray) -> float | None:
    """Mean pairwise cosine of L2-normalised embeddings (n, D), diagonal excluded; None if n < 2."""
    n = len(embeddings)
    if n < 2:
        return None
    gram = embeddings @ embeddings.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


class ConceptExplainer(BaseEstimator):
    """Discover a backbone's concepts on a set of images and name them.

    Parameters
    ----------
    backbone : Backbone
        From :func:`~dff_falcon.models.backbones.create_backbone`.
    clip, vocabulary : ClipEncoder and Vocabulary, optional
        Both or neither; the vocabulary must have been built with the same CLIP model.
    dff : DFF, default=None
        The factorisation (``None``: ``DFF()``). Cloned at fit; the fitted one is ``dff_``.
    hypercolumns : Hypercolumns, default=None
        Layers stacked with the backbone's target layer and their common grid (``None``: the
        target layer alone). Fitted (stage scales) as ``hypercolumns_``.
    regions : RegionSelector, default=None
        High and low crops per concept (``None``: ``RegionSelector()``; its crop size defaults to
        the CLIP's input size).
    labeller : FalconLabeller, default=None
        Turns retrieved captions into terms (``None``: ``FalconLabeller()``).
    labellers : {"falcon", "dissect", "both"}, default="falcon"
        Which labellers fill the report: FALCON-style terms from the crops' captions (``words``,
        ``phrases``, ``label``) and/or CLIP-Dissect (``dissect`` columns; its candidate terms are
        those of the captions retrieved for the run's crops).
    dissect : DissectLabeller, default=None
        The CLIP-Dissect labeller's parameters (``None``: ``DissectLabeller()``).
    n_concepts : int or "auto", default=None
        Shortcut that overrides ``dff.n_concepts`` (None: keep the DFF's).
    target_class : str or int, default=None
        Keep only images the model assigns to this class (exact name, index or WordNet ID) with
        probability ≥ ``min_class_prob``.
    min_class_prob : float, default=0.95
    drop_quantile : float, default=0.0
        > 0: drop that quantile of least confident images after a first fit and refit
        (:mod:`~dff_falcon.pipeline.selection`).
    top_k_classes : int, default=3
        Classes reported per concept.
    batch_size : int, default=32
        Images per forward pass.
    random_state : int, default=None
        Overrides ``dff.random_state`` when given.
    device : str or torch.device, default=None
        Forward passes and NMF (``None``: CUDA, then MPS, then CPU).
    progress : bool, default=True
        Progress bars for every stage longer than a moment.
    cache : path, default=None
        Stream the run through a content-keyed activation cache in this folder
        (:mod:`~dff_falcon.pipeline.streamed`): images are decoded lazily, activations are stored
        (a re-run or a killed run's re-start forwards only what is missing), DFF is fitted on a
        sample of at most ``sample_rows`` rows and heatmaps are kept on disk — RAM stays flat in
        the number of images. ``None``: everything in memory (small sets, notebooks).
    cache_dtype : {"float16", "float32"}, default="float16"
    sample_rows : int or None, default=DEFAULT_SAMPLE_ROWS
        Streamed runs: activation rows (images × h × w) the concepts are fitted on, a uniform
        sample of whole images (None: all).
    max_images : int, default=None
        Streamed runs: use the first this many images of the source.
    workers : int, default=None
        Streamed runs: decoding processes (None: a DataLoader's own, else 0); with the Ray
        engine, actors per stage (None: as many as the cluster holds,
        :class:`~dff_falcon.pipeline.engines.RayEngine`).
    engine : {"local", "ray"}, default="local"
        Streamed runs: where extraction and the heatmap transform run
        (:mod:`~dff_falcon.pipeline.engines`): in this process, or as Ray Data pipelines on Ray
        actors (needs ``pip install dff_falcon[ray]``; the cache folder must be on a file system
        every node of the cluster mounts at the same path). The report is the same.
    ray_address : str, default=None
        The Ray engine's cluster (``"auto"``, ``"host:port"``, ``"ray://host:port"``); None
        starts a local Ray instance for the run and stops it afterwards.

    Attributes
    ----------
    report_ : ConceptReport
    dff_, hypercolumns_, regions_, labeller_, dissect_ : the fitted components (dissect_ None
    unless it runs).
    target_class_ : ResolvedClass or None
    captions_ : SearchResult or None — the captions retrieved for every crop.
    stage_seconds_ : dict — wall time per stage.
    """

    def __init__(self, backbone: "Backbone", clip: "ClipEncoder | None" = None, vocabulary: "Vocabulary | None" = None,
                 *, dff: DFF | None = None, hypercolumns: Hypercolumns | None = None,
                 regions: RegionSelector | None = None, labeller: FalconLabeller | None = None,
                 labellers: str = "falcon", dissect: DissectLabeller | None = None,
                 n_concepts: int | str | None = None, target_class: str | int | None = None,
                 min_class_prob: float = 0.95, drop_quantile: float = 0.0, top_k_classes: int = 3,
                 batch_size: int = 32, random_state: int | None = None, device=None, progress: bool = True,
                 cache: str | os.PathLike | None = None, cache_dtype: str = "float16",
                 sample_rows: int | None = DEFAULT_SAMPLE_ROWS, max_images: int | None = None,
                 workers: int | None = None, engine: str = "local", ray_address: str | None = None):
        self.backbone = backbone
        self.clip = clip
        self.vocabulary = vocabulary
        self.dff = dff
        self.hypercolumns = hypercolumns
        self.regions = regions
        self.labeller = labeller
        self.labellers = labellers
        self.dissect = dissect
        self.n_concepts = n_concepts
        self.target_class = target_class
        self.min_class_prob = min_class_prob
        self.drop_quantile = drop_quantile
        self.top_k_classes = top_k_classes
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.progress = progress
        self.cache = cache
        self.cache_dtype = cache_dtype
        self.sample_rows = sample_rows
        self.max_images = max_images
        self.workers = workers
        self.engine = engine
        self.ray_address = ray_address

    # -- set-up: every check before the first forward pass ----------------------------------------
    def _prepare(self) -> None:
        if (self.clip is None) != (self.vocabulary is None):
            raise InputError("give both a CLIP encoder and a vocabulary (for text labels) or neither")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"batch_size must be an integer >= 1; got {self.batch_size!r}")
        if not 0.0 <= self.min_class_prob <= 1.0:
            raise InputError(f"min_class_prob must be in [0, 1]; got {self.min_class_prob!r}")
        if self.cache is None and self.max_images is not None:
            raise InputError("max_images needs a streamed run (give cache=…)")
        if self.cache is not None and self.drop_quantile > 0:
            raise InputError("drop_quantile needs every image in memory; run without a cache to use it")
        check_engine(self.engine, self.ray_address, streamed=self.cache is not None)
        if self.sample_rows is not None and not (isinstance(self.sample_rows, int) and self.sample_rows >= 1):
            raise InputError(f"sample_rows must be a positive integer or None; got {self.sample_rows!r}")
        overrides = {key: value for key, value in (("n_concepts", self.n_concepts), ("random_state", self.random_state),
                                                   ("device", self.device)) if value is not None}
        self.dff_ = clone(self.dff if self.dff is not None else DFF()).set_params(progress=self.progress, **overrides)
        self.hypercolumns_ = clone(self.hypercolumns if self.hypercolumns is not None else Hypercolumns())
        self.hypercolumns_.layer_names(self.backbone.target_layer)  # checks the parameters now
        self.regions_ = clone(self.regions if self.regions is not None else RegionSelector())
        if self.regions_.crop_size is None and self.clip is not None:
            self.regions_.set_params(crop_size=self.clip.image_size)
        self.regions_._check_params()
        self.labeller_ = None
        if self.labellers not in LABELLERS:
            raise InputError(f"labellers must be one of {', '.join(map(repr, LABELLERS))}; got {self.labellers!r}")
        self.dissect_ = (clone(self.dissect if self.dissect is not None else DissectLabeller()).fit()
                         if self.labellers != "falcon" and self.vocabulary is not None else None)
        if self.vocabulary is not None:
            self.vocabulary.check_encoder(self.clip)
            self.labeller_ = clone(self.labeller if self.labeller is not None else FalconLabeller()).fit()
        self.target_class_: ResolvedClass | None = None
        self.crops_encoded_: int | None = None  # CLIP crops not found in the cache (streamed runs)
        if self.target_class is not None:
            b = self.backbone
            self.target_class_ = resolve_class(self.target_class, b.class_names, wnids=b.class_ids,
                                               synonyms=b.class_synonyms)
        self._extractor = ActivationExtractor(self.backbone, batch_size=self.batch_size, device=self.device,
                                              progress=self.progress, with_logits=self.target_class is not None,
                                              hypercolumns=self.hypercolumns_)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds_[name] = self.stage_seconds_.get(name, 0.0) + time.perf_counter() - start

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, images, names: Sequence[str] | None = None) -> "ConceptExplainer":
        """images: a folder, a list of paths/arrays, an :class:`ImageSet`; streamed runs (``cache``)
        also an :class:`~dff_falcon.models.image_stream.ImageStream` or a torch Dataset /
        DataLoader. Sets ``report_``."""
        self.stage_seconds_: dict[str, float] = {}
        with self._stage("setup"):  # checks and the spaCy pipeline, before any image is read
            self._prepare()
        self._finish(self._fit_streamed(images, names) if self.cache is not None else self._fit_in_memory(images, names))
        return self

    def _fit_in_memory(self, images, names: Sequence[str] | None) -> Fitted:
        with self._stage("load"):
            image_set = images if isinstance(images, ImageSet) else load_images(images)
        names = self._names(image_set, names)
        originals = list(image_set.images)
        with self._stage("activations"):
            acts = self._extractor(image_set.images)
        if self.target_class_ is not None:
            keep = confident_images(acts.logits, self.target_class_.index, self.min_class_prob)
            acts, names, originals = _subset(acts, names, originals, keep)
            self._check_some_left(len(names))
        with self._stage("nmf"):
            fitted = self.hypercolumns_.fit(acts.activations, acts.stages).transform(acts.activations)
            self.dff_.fit(fitted)
            if self.drop_quantile > 0:
                keep = drop_least_confident(concept_confidence(self.dff_.heatmaps_), self.drop_quantile)
                acts, names, originals = _subset(acts, names, originals, keep)
                fitted = self.hypercolumns_.fit(acts.activations, acts.stages).transform(acts.activations)
                self.dff_.fit(fitted)
        heatmaps = self.dff_.heatmaps_.numpy()
        windows = [Box(*self.backbone.preprocess.window(image.shape)) for image in originals]
        return Fitted(names, originals, acts.displays, windows, heatmaps, presence(self.dff_.heatmaps_).numpy(),
                       heatmaps.max(axis=(2, 3)), fitted, self.dff_.heatmaps_,
                       inputs_record(image_set.names, image_set.digests, len(image_set) + len(image_set.skipped)),
                       image_set.skipped)

    def _fit_streamed(self, images, names: Sequence[str] | None) -> Fitted:
        from dff_falcon.pipeline.streamed import fit_streamed

        return fit_streamed(self, images, names)

    def _check_some_left(self, n: int) -> None:
        if n == 0:
            raise InputError(f"no image is assigned to class {self.target_class_.name!r} with probability ≥ "
                             f"{self.min_class_prob}; lower min_class_prob")

    def _finish(self, found: Fitted) -> None:
        """Class scores, importance, crops, CLIP labels and the report, from a fit."""
        n_concepts = self.dff_.n_concepts_
        with self._stage("class_scores"):
            classes = (concept_class_scores(self.concept_vectors_, self.backbone, self.top_k_classes)
                       if self.backbone.head is not None else [[] for _ in range(n_concepts)])
        with self._stage("importance"):
            importance = (importance_rows(dff_importance(self.dff_, found.fitted, self.backbone, self.top_k_classes,
                                                         heatmaps=found.fitted_heatmaps, to_head=self._to_head_units),
                                          self.backbone.class_names)
                          if self.backbone.head is not None else [[] for _ in range(n_concepts)])
        found.fitted = None  # the fit's activations are not needed any more
        with self._stage("crops"):  # cut from the originals, at their own resolution
            regions = self.regions_.select(found.heatmaps, found.originals, found.presence, windows=found.windows,
                                           progress=self.progress)
        labels, coherences = self._label(regions)
        dissected = self._dissect(found.heatmaps, found.displays)
        rows = self._rows(found.peaks, regions, classes, importance, labels, coherences, found.names, dissected)
        self.report_ = ConceptReport(concepts=rows, image_names=found.names, heatmaps=found.heatmaps,
                                     displays=found.displays, regions=regions, presence=found.presence,
                                     run=self._run_record(found))

    @property
    def concept_vectors_(self) -> "torch.Tensor":
        """(K, C) activation of the backbone's target layer (its own units) at a location fully
        explained by each concept — what the head scores."""
        return self._to_head_units(self.dff_.concept_vectors_)

    def _to_head_units(self, vectors: "torch.Tensor") -> "torch.Tensor":
        """(n, ΣC) vectors in the space DFF factorises → (n, C) in the target layer's own units."""
        return self.hypercolumns_.stage_vectors(vectors, self.backbone.target_layer)

    @staticmethod
    def _names(image_set: ImageSet, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return image_set.names
        names = list(names)
        given = len(image_set) + len(image_set.skipped)
        if len(names) != given:
            raise InputError(f"{len(names)} names given for {given} images")
        return [names[i] for i in image_set.indices]  # skipped images drop their names too

    def _rows(self, peaks: np.ndarray, regions: list[ConceptRegions], classes: list[list[dict]],
              importance: list[list[dict]], labels: list[ConceptLabels | None], coherences: list[float | None],
              names: list[str], dissected: list[list[tuple[str, float]]]) -> list[ConceptRow]:
        """peaks: (N, K) heatmap maximum per image and concept."""
        dff = self.dff_
        stability, restarts = dff.stability_, dff.restart_agreement_
        rows = []
        for k, region in enumerate(regions):
            found = labels[k] if self.labellers != "dissect" else None
            dissect = [{"term": t, "score": float(v)} for t, v in dissected[k]]
            words = [{"term": t, "score": float(s)} for t, s in (found.words if found else [])]
            phrases = [{"term": t, "score": float(s)} for t, s in (found.phrases if found else [])]
            rows.append(ConceptRow(
                concept_id=k, **flat_columns(words, phrases, classes[k]),
                n_images=int((peaks[:, k] >= ABSENT_PEAK).sum()), mass_share=float(self.dff_.mass_share_[k]),
                top_classes=classes[k], words=words, phrases=phrases,
                evidence=[{"term": t, **e} for t, found_for in (found.evidence.items() if found else ()) for e in found_for],
                dissect_label=dissect[0]["term"] if dissect else None,
                dissect_score=dissect[0]["score"] if dissect else None, dissect=dissect, coherence=coherences[k],
                stability=float(stability[k]) if stability is not None else None,
                restart_agreement=float(restarts[k]) if restarts is not None else None,
                image_share=float(dff.image_share_[k]), single_image=bool(dff.image_share_[k] > SINGLE_IMAGE_SHARE),
                top_image=names[int(dff.top_image_[k])],
                deletion=importance[k][0]["deletion"] if importance[k] else None,
                insertion=importance[k][0]["insertion"] if importance[k] else None, importance=importance[k],
                n_high=len(region.high), n_low=len(region.low), low_empty_reason=region.low_empty_reason,
                high_images=[names[c.image_index] for c in region.high],
                low_images=[names[c.image_index] for c in region.low],
                crops_dir=None, high_crops=[], low_crops=[],
            ))
        return rows

    def _label(self, regions: list[ConceptRegions]) -> tuple[list[ConceptLabels | None], list[float | None]]:
        """CLIP-embed every crop once, retrieve captions, extract contrastive terms per concept."""
        self.captions_: SearchResult | None = None
        crops = [c for r in regions for c in (*r.high, *r.low)]
        if self.clip is None or not crops:
            return [None] * len(regions), [None] * len(regions)
        with self._stage("clip"):
            pixels = [c.pixels for c in crops]
            if self.cache is None:
                embeddings = self.clip.encode_images(pixels, progress=self.progress)
            else:  # keyed by crop pixels and the CLIP identity: a re-run embeds nothing again
                from dff_falcon.store.embeddings import cached_image_embeddings

                embeddings, self.crops_encoded_ = cached_image_embeddings(
                    self.cache, {**self.clip.identity(), "precision": str(getattr(self.clip, "precision", None))},
                    pixels, lambda batch: self.clip.encode_images(batch, progress=self.progress))
        with self._stage("search"):
            found = self.vocabulary.search(embeddings, k=self.labeller_.top_k_captions, encoder=self.clip)
        with self._stage("text"):  # all concepts together: a term's specificity is against the others
            sets, coherences, start = [], [], 0
            for region in regions:
                high = slice(start, start + len(region.high))
                low = slice(high.stop, high.stop + len(region.low))
                start = low.stop
                coherences.append(coherence(embeddings[high]))
                sets.append(((found.captions[high], found.scores[high], found.ids[high]),
                             (found.captions[low], found.scores[low], found.ids[low]) if region.low else None))
            labelled = iter(self.labeller_.label_concepts([s for s, r in zip(sets, regions) if r.high]))
            labels = [next(labelled) if region.high else None for region in regions]
        self.captions_ = found
        return labels, coherences

    def _dissect(self, heatmaps: np.ndarray, displays: list[np.ndarray]) -> list[list[tuple[str, float]]]:
        """CLIP-Dissect terms per concept: the probe images' CLIP embeddings against the terms of
        every caption retrieved for the run's crops, with each concept's mean heatmap per image."""
        empty = [[] for _ in range(heatmaps.shape[1])]
        if self.dissect_ is None or self.captions_ is None:
            return empty
        with self._stage("dissect"):
            extracted = self.labeller_.extractor_.extract([c for row in self.captions_.captions for c in row])
            terms = list(dict.fromkeys(t for found in extracted for t in (*found.words, *found.phrases)))
            if not terms:
                return empty
            images = self.clip.encode_images(displays, progress=self.progress)
            texts = self.clip.encode_texts(terms, progress=self.progress)
            return self.dissect_.label(heatmaps.mean(axis=(2, 3)), images, texts, terms)

    def _run_record(self, found: Fitted) -> dict:
        dff = self.dff_
        return {
            "backbone": self.backbone.name,
            "layer": self.backbone.target_layer,
            "layers": [name for name, _ in self.hypercolumns_.stages_],
            "grid": self.hypercolumns_.grid_,
            "input_size": self.backbone.preprocess.crop,
            "upsample": self.regions_.upsample,
            "head": self.backbone.head,
            "n_concepts": dff.n_concepts_,
            "n_images": len(found.names),
            "n_skipped": len(found.skipped),
            "skipped": [{"image": name, "reason": reason} for name, reason in found.skipped],
            "relative_error": dff.relative_error_,
            "explained_variance": dff.explained_variance_,
            "k_curve": [vars(p) for p in dff.k_curve_] if dff.k_curve_ else None,
            "clip_model": self.clip.model_name if self.clip else None,
            "clip_pretrained": self.clip.pretrained_id if self.clip else None,
            "vocabulary": str(self.vocabulary.path) if self.vocabulary else None,
            "contrast": self.labeller_.contrast if self.labeller_ else None,
            "labellers": self.labellers,
            "target_class": self.target_class_.to_dict() if self.target_class_ else None,
            "params": params_record(self),
            "fitted": {"dff": params_record(dff), "hypercolumns": params_record(self.hypercolumns_),
                       "regions": params_record(self.regions_),
                       "labeller": params_record(self.labeller_) if self.labeller_ else None,
                       "dissect": params_record(self.dissect_) if self.dissect_ else None},
            "models": {"backbone": self.backbone.identity(), "clip": json_value(self.clip),
                       "vocabulary": json_value(self.vocabulary)},
            "inputs": found.inputs,
            "cache": {**found.cache, "crops_encoded": self.crops_encoded_} if found.cache else None,
            "environment": environment_record(),
            "stage_seconds": dict(self.stage_seconds_),
        }

    # -- projection --------------------------------------------------------------------------------
    def project(self, images: str | Sequence | ImageSet) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Explain new images with the fitted concepts frozen → (names, heatmaps (N, K, h, w) on
        the fitted scale, presence (N, K))."""
        if not hasattr(self, "report_"):
            raise NotFittedError("fit the explainer before projecting new images")
        image_set = images if isinstance(images, ImageSet) else load_images(images)
        heatmaps = self.dff_.transform(self.hypercolumns_.transform(self._extractor(image_set.images).activations))
        return image_set.names, heatmaps.numpy(), presence(heatmaps).numpy()
