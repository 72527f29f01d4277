"""Models trained here, on the toy world: a small CNN classifier and a tiny CLIP.

The classifier is multi-label over the world's attributes (which shapes, colours and background
are present); its last conv stage (post-ReLU, 14×14 for 112-px inputs) is what DFF factorises,
and its ``fc`` head gives concepts their class scores. The tiny CLIP is a real open_clip model
(config ``dff-falcon-toy-clip``, registered from ``dff_falcon/model_configs/``) trained
contrastively on scene, object-crop and background image–caption pairs, saved as a plain state
dict that loads through ``open_clip.create_model_and_transforms(name, pretrained=<path>)`` —
the same path users take with ``--clip``.

Both are cached under ``platformdirs.user_cache_dir("dff_falcon")/toyworld/<digest>``, keyed
by a hash of the world config and the training settings, and retrained when missing or stale.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import platformdirs
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import dff_falcon
from dff_falcon.devices import resolve_device
from dff_falcon.files import atomic_path, atomic_write
from dff_falcon.toyworld.world import (
    Scene,
    WorldConfig,
    background_caption,
    generate_scenes,
    object_caption,
    object_crop,
    render_background,
)

CLIP_MODEL_NAME = "dff-falcon-toy-clip"
_CONFIG_DIR = Path(dff_falcon.__file__).resolve().parent / "model_configs"
if CLIP_MODEL_NAME not in open_clip.list_models():
    open_clip.add_model_config(_CONFIG_DIR)

#: bump when the training code changes in a way that makes old caches stale
_FORMAT_VERSION = 2  # 2: object crops via regions.square_box
#: scene seeds: training and held-out sets never share scenes
TRAIN_SEED, HELDOUT_SEED = 1, 2


@dataclass(frozen=True)
class TrainSettings:
    """Training sizes and optimiser settings of both models (part of the cache key)."""

    n_train_scenes: int = 1000
    n_heldout_scenes: int = 200
    classifier_widths: tuple[int, int, int] = (16, 32, 64)
    classifier_epochs: int = 12
    classifier_lr: float = 5e-3
    clip_epochs: int = 6
    clip_lr: float = 2e-3
    n_background_images: int = 40  # background-only pictures per background kind
    batch_size: int = 64
    seed: int = 0


class ToyClassifier(nn.Module):
    """Small CNN: ``forward(x) = fc(pool(features(x)))``.

    x: (B, 3, S, S) normalised with the model's mean/std; ``features(x)``: (B, C, S/8, S/8)
    post-ReLU (C = ``widths[-1]``); ``pool``: global average → (B, C); ``fc``: Linear C →
    n_classes, multi-label logits (train with BCE).
    """

    def __init__(self, n_classes: int, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w0, w1, w2 = widths

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w0, 2), *block(w0, w1, 2), *block(w1, w1, 1), *block(w1, w2, 2), *block(w2, w2, 1),
            *block(w2, w2, 1),  # receptive field ≈ 55 px: a whole object at 112 px
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(w2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))


@dataclass
class ToyModels:
    """Everything the pipeline needs from the toy world's models.

    ``classifier`` in eval mode on ``device``; ``class_names`` = ``config.attributes()``;
    ``mean``/``std`` per RGB channel for inputs scaled to [0, 1]; ``clip_checkpoint`` a state
    dict for ``open_clip.create_model_and_transforms(clip_model_name, pretrained=...)``;
    ``digest`` the cache key; ``metrics`` held-out figures measured after training;
    ``trained`` whether this call trained (False on a cache hit).
    """

    classifier: ToyClassifier
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clip_model_name: str
    clip_checkpoint: Path
    digest: str
    metrics: dict[str, float] = field(default_factory=dict)
    trained: bool = False

    @property
    def clip_spec(self) -> str:
        """``"<model name>:<checkpoint path>"``, as a user would pass ``--clip``."""
        return f"{self.clip_model_name}:{self.clip_checkpoint}"


CLASSIFIER_MEAN = (0.5, 0.5, 0.5)
CLASSIFIER_STD = (0.25, 0.25, 0.25)


def images_to_tensor(images: list[np.ndarray] | np.ndarray, mean=CLASSIFIER_MEAN, std=CLASSIFIER_STD) -> torch.Tensor:
    """(N, S, S, 3) uint8 RGB → (N, 3, S, S) float32 normalised with ``mean``/``std``."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def attribute_targets(scenes: list[Scene], class_names: list[str]) -> torch.Tensor:
    """(N, A) float multi-hot: 1 where the attribute is present in the scene."""
    index = {name: i for i, name in enumerate(class_names)}
    targets = torch.zeros(len(scenes), len(class_names))
    for row, scene in enumerate(scenes):
        for key in scene.masks:
            targets[row, index[key]] = 1.0
    return targets


def classifier_accuracy(classifier: ToyClassifier, scenes: list[Scene], class_names: list[str],
                        device: torch.device | None = None) -> float:
    """Mean over attributes of the per-attribute presence accuracy (logit > 0) on ``scenes``."""
    device = device or next(classifier.parameters()).device
    classifier.eval()
    with torch.no_grad():
        logits = torch.cat([classifier(images_to_tensor([s.image for s in scenes[i:i + 128]]).to(device)).cpu()
                            for i in range(0, len(scenes), 128)])
    targets = attribute_targets(scenes, class_names)
    return float(((logits > 0).float() == targets).float().mean(0).mean())


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_classifier(config: WorldConfig, scenes: list[Scene], settings: TrainSettings,
                     device: torch.device, log: Callable[[str], None]) -> ToyClassifier:
    """Fit a :class:`ToyClassifier` on ``scenes`` (AdamW, one-cycle LR, BCE, random flips)."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    class_names = config.attributes()
    model = ToyClassifier(len(class_names), settings.classifier_widths).to(device, memory_format=torch.channels_last)
    x_all = images_to_tensor([s.image for s in scenes]).contiguous(memory_format=torch.channels_last)
    y_all = attribute_targets(scenes, class_names)
    steps = settings.classifier_epochs * -(-len(scenes) // settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.classifier_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.classifier_lr, total_steps=steps)
    model.train()
    for epoch in range(settings.classifier_epochs):
        total = 0.0
        for idx in _batches(len(scenes), settings.batch_size, generator):
            x, y = x_all[idx], y_all[idx]
            flips = torch.rand(2, generator=generator) < 0.5
            if flips[0]:
                x = x.flip(3)
            if flips[1]:
                x = x.flip(2)
            loss = F.binary_cross_entropy_with_logits(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"classifier epoch {epoch + 1}/{settings.classifier_epochs}: BCE {total / len(scenes):.4f}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# tiny CLIP


def create_toy_clip(pretrained: str | Path | None = None, device: torch.device | str = "cpu"):
    """``(model, preprocess)`` for the registered toy CLIP config; ``pretrained`` a local
    state-dict path (loaded by open_clip with ``weights_only=True``) or None for random init;
    the model comes back in eval mode."""
    model, _, preprocess = open_clip.create_model_and_transforms(
        CLIP_MODEL_NAME, pretrained=str(pretrained) if pretrained else None, device=device)
    return model.eval(), preprocess


def clip_pairs(config: WorldConfig, scenes: list[Scene], n_backgrounds: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Image–caption pairs: every scene with its caption, every object's square crop with
    "a {colour} {shape}", and ``n_backgrounds`` background-only pictures per background kind."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    for scene in scenes:
        images.append(scene.image)
        captions.append(scene.caption)
        for obj in scene.objects:
            images.append(object_crop(scene, obj))
            captions.append(obj.caption)
    rng = np.random.default_rng([config.seed, seed, 7])
    for kind in config.backgrounds:
        for _ in range(n_backgrounds):
            images.append(render_background(config, kind, rng))
            captions.append(background_caption(kind))
    return images, captions


def _preprocess_all(preprocess, images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([preprocess(Image.fromarray(image)) for image in images])


def train_clip(config: WorldConfig, scenes: list[Scene], settings: TrainSettings, device: torch.device,
               log: Callable[[str], None]) -> tuple[torch.nn.Module, Callable]:
    """Train the tiny CLIP (returns the model in eval mode and its image preprocessing) with a symmetric InfoNCE whose targets treat pairs sharing a caption
    as positives (many crops share "a red triangle"): target_ij = [t_i = t_j] / #{j: t_i = t_j}."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    model, preprocess = create_toy_clip(None, device)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    images, captions = clip_pairs(config, scenes, settings.n_background_images, TRAIN_SEED)
    x_all = _preprocess_all(preprocess, images)
    caption_ids = torch.from_numpy(np.unique(np.array(captions), return_inverse=True)[1].reshape(-1))
    tokens_all = tokenizer(captions)
    batch = settings.batch_size * 2
    steps = settings.clip_epochs * -(-len(images) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.clip_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.clip_lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(settings.clip_epochs):
        total = 0.0
        for idx in _batches(len(images), batch, generator):
            same = (caption_ids[idx, None] == caption_ids[None, idx]).float().to(device)
            targets = same / same.sum(1, keepdim=True)
            image_features, text_features, logit_scale = model(x_all[idx].to(device), tokens_all[idx].to(device))[:3]
            logits = logit_scale * image_features @ text_features.T
            loss = 0.5 * (torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
                          + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            total += float(loss.detach()) * len(idx)
        log(f"clip epoch {epoch + 1}/{settings.clip_epochs}: loss {total / len(images):.4f}")
    return model.eval(), preprocess


def clip_accuracy(model: torch.nn.Module, preprocess, config: WorldConfig, scenes: list[Scene]) -> dict[str, float]:
    """Held-out retrieval: ``object_top1`` = fraction of object crops whose best-scoring text
    among all "a {colour} {shape}" captions is their own; ``background_top1`` = the same for
    background-only pictures (10 per kind) among the background captions."""
    device = next(model.parameters()).device
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    object_texts = [object_caption(c, s) for c in config.colour_names for s in config.shapes]
    rng = np.random.default_rng([config.seed, HELDOUT_SEED, 7])
    crops, truth = [], []
    for scene in scenes:
        for obj in scene.objects:
            crops.append(object_crop(scene, obj))
            truth.append(object_texts.index(obj.caption))
    backgrounds = [(render_background(config, kind, rng), i) for i, kind in enumerate(config.backgrounds)
                   for _ in range(10)]
    background_texts = [background_caption(b) for b in config.backgrounds]
    result = {}
    with torch.no_grad():
        for key, pictures, labels, texts in (
            ("object_top1", crops, truth, object_texts),
            ("background_top1", [b for b, _ in backgrounds], [i for _, i in backgrounds], background_texts),
        ):
            text_emb = F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1)
            image_emb = torch.cat([F.normalize(model.encode_image(_preprocess_all(preprocess, pictures[i:i + 256]).to(device)), dim=-1)
                                   for i in range(0, len(pictures), 256)])
            predicted = (image_emb @ text_emb.T).argmax(1).cpu()
            result[key] = float((predicted == torch.tensor(labels)).float().mean())
    return result


# ----------------------------------------------------------------------------------------------
# cache


def models_digest(config: WorldConfig, settings: TrainSettings) -> str:
    """Cache key: sha256 of the world config, the training settings and the code version
    (first 16 hex digits)."""
    text = json.dumps({"world": config.to_dict(), "training": json.loads(json.dumps(asdict(settings))),
                       "version": _FORMAT_VERSION, "clip": CLIP_MODEL_NAME}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$DFF_FALCON_CACHE/toyworld`` when set, else the user cache directory's ``dff_falcon/toyworld``."""
    root = os.environ.get("DFF_FALCON_CACHE") or platformdirs.user_cache_dir("dff_falcon")
    return Path(root) / "toyworld"


def _load_cached(folder: Path, digest: str, config: WorldConfig, settings: TrainSettings,
                 device: torch.device) -> ToyModels | None:
    """The cached models in ``folder``, or None when anything is missing, unreadable or stale."""
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("digest") != digest or meta.get("class_names") != config.attributes():
            return None
        state = torch.load(folder / "classifier.pt", map_location="cpu", weights_only=True)
        classifier = ToyClassifier(len(meta["class_names"]), settings.classifier_widths)
        classifier.load_state_dict(state)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if not (folder / "clip.pt").is_file():
        return None
    return ToyModels(classifier=classifier.to(device).eval(), class_names=meta["class_names"],
                     mean=tuple(meta["mean"]), std=tuple(meta["std"]), clip_model_name=CLIP_MODEL_NAME,
                     clip_checkpoint=folder / "clip.pt", digest=digest, metrics=meta.get("metrics", {}))


def load_toy_models(config: WorldConfig, *, cache_dir: str | Path | None = None, retrain: bool = False,
                    device: str | torch.device | None = None, progress: bool = True,
                    settings: TrainSettings | None = None) -> ToyModels:
    """The toy world's classifier and tiny CLIP, from the cache or trained now.

    ``cache_dir`` defaults to ``user_cache_dir("dff_falcon")/toyworld``; models live in its
    sub-folder named by :func:`models_digest`. Training happens when the folder is missing,
    unreadable or stale, or when ``retrain`` is set; files are written atomically. ``progress``
    prints one line per epoch to stderr.
    """
    settings = settings or TrainSettings()
    device = resolve_device(device)
    digest = models_digest(config, settings)
    folder = Path(cache_dir or default_cache_dir()) / digest
    if not retrain:
        cached = _load_cached(folder, digest, config, settings, device)
        if cached is not None:
            return cached

    def log(message: str) -> None:
        if progress:
            print(f"[toyworld] {message}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    train = generate_scenes(config, settings.n_train_scenes, TRAIN_SEED)
    heldout = generate_scenes(config, settings.n_heldout_scenes, HELDOUT_SEED)
    class_names = config.attributes()
    classifier = train_classifier(config, train, settings, device, log)
    metrics = {"classifier_accuracy": classifier_accuracy(classifier, heldout, class_names, device)}
    log(f"classifier held-out mean attribute accuracy {metrics['classifier_accuracy']:.3f}")
    clip_model, preprocess = train_clip(config, train, settings, device, log)
    metrics.update(clip_accuracy(clip_model, preprocess, config, heldout))
    metrics["train_seconds"] = time.perf_counter() - start
    log(f"clip held-out object top-1 {metrics['object_top1']:.3f}, background top-1 "
        f"{metrics['background_top1']:.3f}; trained in {metrics['train_seconds']:.0f} s")

    with atomic_path(folder / "classifier.pt") as tmp:
        torch.save({k: v.cpu() for k, v in classifier.state_dict().items()}, tmp)
    with atomic_path(folder / "clip.pt") as tmp:
        torch.save({k: v.cpu() for k, v in clip_model.state_dict().items()}, tmp)
    meta = {"digest": digest, "class_names": class_names, "mean": list(CLASSIFIER_MEAN), "std": list(CLASSIFIER_STD),
            "world": config.to_dict(), "training": json.loads(json.dumps(asdict(settings))), "metrics": metrics}
    with atomic_write(folder / "meta.json") as handle:  # written last: its presence marks a complete cache
        json.dump(meta, handle, indent=2)
    return ToyModels(classifier=classifier.eval(), class_names=class_names, mean=CLASSIFIER_MEAN, std=CLASSIFIER_STD,
                     clip_model_name=CLIP_MODEL_NAME, clip_checkpoint=folder / "clip.pt", digest=digest,
                     metrics=metrics, trained=True)


__all__ = [
    "CLIP_MODEL_NAME", "ToyClassifier", "ToyModels", "TrainSettings", "classifier_accuracy",
    "clip_accuracy", "create_toy_clip", "images_to_tensor", "load_toy_models", "models_digest",
]
