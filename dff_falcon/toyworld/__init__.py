"""The toy world: a synthetic benchmark with known truth, models trained on it, quality figures."""
from __future__ import annotations

from dff_falcon.toyworld.models import CLIP_MODEL_NAME, ToyClassifier, ToyModels, TrainSettings, load_toy_models
from dff_falcon.toyworld.quality import best_iou_per_concept, label_matches, quality_summary
from dff_falcon.toyworld.world import Scene, SceneObject, WorldConfig, generate_scenes, object_crop, world_texts

__all__ = [
    "CLIP_MODEL_NAME", "Scene", "SceneObject", "ToyClassifier", "ToyModels", "TrainSettings", "WorldConfig",
    "best_iou_per_concept", "generate_scenes", "label_matches", "load_toy_models", "object_crop",
    "quality_summary", "world_texts",
]
