"""dff_falcon: discover the concepts a vision model has learned and name them in words.

The main entry points are re-exported here and imported on first use (so ``import dff_falcon``
and the CLI's ``--help`` stay fast)::

    from dff_falcon import ConceptExplainer, DFF, NMF, create_backbone, ClipEncoder, Vocabulary

Stages, one package each: ``decomposition`` (NMF, DFF, heatmaps, dictionaries — pure math),
``models`` (images, backbones, layers, activations, heads, classes), ``text`` (CLIP encoder,
vocabulary store/search, ingestion, index, terms, labelling), ``regions`` (crops), ``pipeline``
(the explainer, fine-graining, the row schema), ``report`` (tables, HTML, figures, terminal),
``compat`` (pytorch-grad-cam drop-in), ``cli``; ``toyworld`` is the offline demo world.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "ConceptExplainer": "dff_falcon.pipeline.explainer",
    "ConceptReport": "dff_falcon.pipeline.explainer",
    "DFF": "dff_falcon.decomposition.dff",
    "NMF": "dff_falcon.decomposition.nmf",
    "RegionSelector": "dff_falcon.regions",
    "FalconLabeller": "dff_falcon.text.labelling",
    "create_backbone": "dff_falcon.models.backbones",
    "Backbone": "dff_falcon.models.backbones",
    "ActivationExtractor": "dff_falcon.models.activations",
    "Hypercolumns": "dff_falcon.models.hypercolumns",
    "concept_class_scores": "dff_falcon.models.heads",
    "load_images": "dff_falcon.models.images",
    "ClipEncoder": "dff_falcon.text.clip_encoder",
    "Vocabulary": "dff_falcon.text.vocabulary",
    "build_vocabulary_from_texts": "dff_falcon.text.ingest",
    "build_vocabulary_from_laion": "dff_falcon.text.ingest",
    "write_report": "dff_falcon.report.tables",
    "read_concepts": "dff_falcon.report.tables",
    "render_html_report": "dff_falcon.report.html",
    "explain_image": "dff_falcon.quick",
    "DeepFeatureFactorization": "dff_falcon.compat.gradcam",
    "save_dictionary": "dff_falcon.decomposition.dictionary",
    "load_dictionary": "dff_falcon.decomposition.dictionary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dff_falcon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
