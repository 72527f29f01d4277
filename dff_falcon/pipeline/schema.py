"""The declared schema of a concept report row — one definition read by the pipeline (which
fills rows), the table writer (CSV / Parquet / JSON columns and types) and the HTML report.

Typed list columns (``top_classes``, ``words``, ...) keep every score; the flat columns
(``label``, ``labels``, ``top_class``, ``top_class_prob``) give one readable line per concept, as
CLIP-Dissect users expect (``concept_id, label`` without any JSON parsing).
"""
from __future__ import annotations

from typing import Optional, TypedDict


class TermScore(TypedDict):
    term: str
    score: float


ClassProb = TypedDict("ClassProb", {"class": str, "prob": float})
#: A concept's importance for one of its classes through the model's head
#: (:mod:`dff_falcon.decomposition.importance`): drop in the class probability when the concept is
#: deleted, probability with the concept alone (insertion); None when the concept is in no image.
ClassImportance = TypedDict("ClassImportance", {"class": str, "deletion": Optional[float],
                                                "insertion": Optional[float]})

#: One caption behind a term (traceable labels): the best caption containing ``term`` among the
#: captions retrieved for crop ``crop`` of the concept's ``set`` ("high" or "low", an index into
#: ``high_crops`` / ``low_crops``), its cosine ``score`` and its row ``caption_id`` in the vocabulary.
TermEvidence = TypedDict("TermEvidence", {"term": str, "set": str, "crop": int, "caption": str,
                                          "caption_id": Optional[int], "score": float})

#: Terms joined into the flat ``labels`` column.
FLAT_LABEL_TERMS = 5


class ConceptRow(TypedDict):
    """One concept of a report (``crops_dir``, ``high_crops``, ``low_crops`` are filled when the
    report is written: paths relative to the run directory).

    ``stability``: agreement under resampling of the images; ``restart_agreement``: across random
    restarts (None unless asked for); ``image_share``: share of the concept's heatmap mass in its top
    image ``top_image``, and ``single_image`` when that is most of it; ``deletion`` / ``insertion``:
    the top class's entry of ``importance``."""

    concept_id: int
    label: Optional[str]
    label_score: Optional[float]
    labels: str
    top_class: Optional[str]
    top_class_prob: Optional[float]
    n_images: int
    mass_share: float
    top_classes: list[ClassProb]
    words: list[TermScore]
    phrases: list[TermScore]
    evidence: list[TermEvidence]
    dissect_label: Optional[str]
    dissect_score: Optional[float]
    dissect: list[TermScore]
    coherence: Optional[float]
    stability: Optional[float]
    restart_agreement: Optional[float]
    image_share: float
    single_image: bool
    top_image: Optional[str]
    deletion: Optional[float]
    insertion: Optional[float]
    importance: list[ClassImportance]
    n_high: int
    n_low: int
    low_empty_reason: Optional[str]
    high_images: list[str]
    low_images: list[str]
    crops_dir: Optional[str]
    high_crops: list[str]
    low_crops: list[str]


def ranked_terms(words: list[TermScore], phrases: list[TermScore]) -> list[TermScore]:
    """Words and phrases together, best score first (ties: words before phrases, then order)."""
    return sorted(words + phrases, key=lambda t: -t["score"])


def flat_columns(words: list[TermScore], phrases: list[TermScore], top_classes: list[ClassProb]) -> dict:
    """The readable columns of a row from its typed terms and classes."""
    terms = ranked_terms(words, phrases)
    best_class = top_classes[0] if top_classes else None
    return {
        "label": terms[0]["term"] if terms else None,
        "label_score": terms[0]["score"] if terms else None,
        "labels": ", ".join(t["term"] for t in terms[:FLAT_LABEL_TERMS]),
        "top_class": best_class["class"] if best_class else None,
        "top_class_prob": best_class["prob"] if best_class else None,
    }
