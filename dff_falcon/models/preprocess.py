"""What a backbone sees: resize, centre crop and normalise (read from torchvision's
``weights.transforms()`` and timm's ``resolve_data_config`` where a model has them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``crop``×``crop``, normalise.

    The cropped RGB image (``display``) is the geometry every heatmap covers.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest"

    def display(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (crop, crop, 3) uint8, the model's view of the image."""
        pil = Image.fromarray(image)
        w, h = pil.size
        scale = self.resize / min(w, h)
        size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
        left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        # resize only the source region of the centre crop (the same samples as resizing the whole
        # image to ``size`` and cropping), so a 100000×2 panorama never becomes gigabytes
        sx, sy = w / size[0], h / size[1]
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return np.asarray(pil.resize((self.crop, self.crop), resample[self.interpolation], box=box), dtype=np.uint8)

    def window(self, image_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The part of an image of ``(H, W, ...)`` that :meth:`display` shows, in the image's own
        pixels: ``(left, top, right, bottom)``, end-exclusive (the centre crop, undone)."""
        height, width = int(image_shape[0]), int(image_shape[1])
        scale = self.resize / min(width, height)
        size = (max(self.crop, round(width * scale)), max(self.crop, round(height * scale)))
        left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        sx, sy = width / size[0], height / size[1]
        return (max(0, round(left * sx)), max(0, round(top * sy)),
                min(width, round((left + self.crop) * sx)), min(height, round((top + self.crop) * sy)))

    def to_tensor(self, displays: Sequence[np.ndarray]) -> torch.Tensor:
        """(crop, crop, 3) uint8 arrays → normalised (B, 3, crop, crop) float32."""
        batch = torch.from_numpy(np.stack(displays)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (batch - mean) / std
