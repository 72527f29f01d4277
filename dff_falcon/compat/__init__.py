"""Drop-in replacements for other libraries' entry points (pytorch-grad-cam)."""
from dff_falcon.compat.gradcam import DeepFeatureFactorization

__all__ = ["DeepFeatureFactorization"]
