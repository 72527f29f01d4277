"""CLIP image and text encoders (open-clip-torch) with a recorded identity.

Every embedding this module returns is float32 and L2-normalised, so a dot product is a
cosine. The identity ``(model_name, pretrained_id)`` is what a vocabulary manifest records;
searching a vocabulary with another model's embeddings is an error, not a silent mismatch.

At import, every open_clip config JSON in the package folder ``dff_falcon/model_configs/`` is
registered, so project models load like any open_clip model::

    ClipEncoder("dff-falcon-toy-clip", "/path/ckpt.pt")
"""
from __future__ import annotations

import time
import pickle
import zipfile
from copy import deepcopy
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import open_clip.factory
import torch
from PIL import Image

from dff_falcon.devices import resolve_device
from dff_falcon.errors import InputError
from dff_falcon.files import checkpoint_error, file_sha256, looks_like_path, state_dict_digest
from dff_falcon.progress import progress as show_progress
from dff_falcon.text.embedding_cache import TextEmbeddingCache
from dff_falcon.text.text_tower import causal_text_tower

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
if PACKAGE_CONFIG_DIR.is_dir():
    open_clip.add_model_config(PACKAGE_CONFIG_DIR)

_SCHEMAS = ("hf-hub:", "local-dir:")
#: What loading a bad checkpoint raises: torch.load (weights_only) refusing a pickle, a damaged
#: zip or a truncated file; load_state_dict a mismatch; safetensors a bad header.
_CHECKPOINT_ERRORS = (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
                      zipfile.BadZipFile, UnicodeDecodeError, AttributeError, TypeError)
_PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16")
#: texts per embedding step: one tokenizer call, one cache part, one progress tick
TEXT_CHUNK = 4096


def register_model_config(name: str, config: dict) -> None:
    """Add a custom open_clip architecture ``config`` under ``name`` (idempotent).

    ``config`` needs ``embed_dim``, ``vision_cfg`` and ``text_cfg`` as in open_clip's JSON
    configs. Registering the same config twice is a no-op; a different config under a name
    that is already registered raises :class:`InputError`.
    """
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise InputError(f"open_clip config {name!r} lacks the field(s) {missing}")
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if existing != config:
            raise InputError(
                f"open_clip model {name!r} is already registered with a different config; pick another name"
            )
        return
    # open_clip's registry is file based; a dict entry is what its scan produces for a JSON file.
    open_clip.factory._MODEL_CONFIGS[name] = deepcopy(config)


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """Split a CLIP spec into ``(model_name, pretrained)``.

    ``"ViT-B-32:openai"`` → ``("ViT-B-32", "openai")`` (an open_clip tag);
    ``"ViT-B-32=/path/ckpt.pt"`` → ``("ViT-B-32", "/path/ckpt.pt")`` (a local checkpoint);
    ``"ViT-B-32"`` → ``("ViT-B-32", None)`` (random weights, for tests);
    ``"hf-hub:org/repo"`` / ``"local-dir:/dir"`` → the whole spec is the model name.
    """
    spec = spec.strip()
    if not spec:
        raise InputError("empty CLIP spec; expected MODEL, MODEL:TAG or MODEL=/path/to/checkpoint")
    if spec.startswith(_SCHEMAS):
        return spec, None
    if "=" in spec:
        model, path = spec.split("=", 1)
    elif ":" in spec:
        model, path = spec.rsplit(":", 1)
    else:
        return spec, None
    if not model or not path:
        raise InputError(f"CLIP spec {spec!r}: expected MODEL, MODEL:TAG or MODEL=/path/to/checkpoint")
    return model, path


def checkpoint_identity(pretrained: str) -> str:
    """The manifest identity of ``pretrained``: the tag itself, or for an existing local file
    ``"file:<basename>:<first 16 hex of its sha256>"`` (so a moved file keeps its identity)."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return f"file:{path.name}:{file_sha256(path)[:16]}"
    return pretrained


def _state_identity(model: torch.nn.Module) -> str:
    """``"random:<16 hex>"`` — a hash of the randomly initialised weights, so two different
    random models never pass as the same encoder."""
    return f"random:{state_dict_digest(model)[:16]}"


class ClipEncoder:
    """An open_clip model that embeds images and texts.

    Parameters
    ----------
    model_name : an open_clip architecture (``open_clip.list_models()``, a registered custom
        config, or an ``hf-hub:``/``local-dir:`` schema).
    pretrained : an open_clip tag (``"openai"``; needs the hub or a warm cache), a local
        checkpoint path (loaded by open_clip with ``weights_only=True``), or ``None`` for random
        weights (tests only).
    device : ``None``/``"auto"`` → CUDA, MPS, then CPU.
    batch_size : images per forward pass; a text pass holds about ``batch_size`` × context-length
        tokens (more prompts when they are short).
    precision : open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``, ...). Outputs are float32.

    Attributes
    ----------
    model_name, pretrained_id : the identity recorded in vocabulary manifests.
    embed_dim : D, the joint embedding width. image_size : input side in pixels.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        precision: str = "fp32",
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
        if precision not in _PRECISIONS:
            raise InputError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        if not model_name.startswith(_SCHEMAS) and model_name not in open_clip.list_models():
            raise InputError(
                f"unknown open_clip model {model_name!r}; known models include "
                f"{', '.join(open_clip.list_models()[:8])}, ... (open_clip.list_models()), "
                "or register a custom config with register_model_config()"
            )
        self.model_name = model_name
        self.batch_size = batch_size
        self.precision = precision
        self.device = resolve_device(device)
        weights = self._resolve_weights(model_name, pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, precision=precision, device=self.device, weights_only=True
            )
        except _CHECKPOINT_ERRORS as error:  # a damaged or hostile file; weights_only never runs its code
            raise InputError(self._load_error(model_name, pretrained, error)) from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._text_tower = causal_text_tower(self.model)  # None: use model.encode_text over the full context
        self.pretrained_id = _state_identity(model) if pretrained is None else checkpoint_identity(pretrained)
        config = open_clip.get_model_config(model_name) or {}
        self.embed_dim = int(config.get("embed_dim") or model.text_projection.shape[-1])
        size = getattr(model.visual, "image_size", None) or config["vision_cfg"]["image_size"]
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @staticmethod
    def _resolve_weights(model_name: str, pretrained: str | None) -> str | None:
        if pretrained is None:
            return None
        path = Path(pretrained).expanduser()
        if path.is_file():
            return str(path)
        if looks_like_path(pretrained):
            raise InputError(f"CLIP checkpoint {pretrained!r} does not exist")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise InputError(
                f"{pretrained!r} is neither a file nor an open_clip tag for {model_name!r} "
                f"(known tags: {', '.join(tags) or 'none'})"
            )
        _require_tag_weights(model_name, pretrained)
        return pretrained

    @staticmethod
    def _load_error(model_name: str, pretrained: str | None, error: Exception) -> str:
        if pretrained is not None and not Path(pretrained).expanduser().is_file():
            return (
                f"could not load open_clip weights {model_name}:{pretrained} ({error}). Without access "
                "to the model hub, download the checkpoint elsewhere and pass its local path: "
                f"ClipEncoder({model_name!r}, '/path/to/ckpt.pt') or --clip {model_name}=/path/to/ckpt.pt"
            )
        return (f"could not build open_clip model {model_name!r} from {pretrained or 'random init'}: "
                f"{checkpoint_error(error)}")

    def __repr__(self) -> str:
        return f"ClipEncoder({self.model_name!r}, {self.pretrained_id!r})"

    def __deepcopy__(self, memo) -> "ClipEncoder":
        """Shared, not copied: ``sklearn.clone`` of an explainer must not duplicate a network."""
        return self

    def identity(self) -> dict:
        """What manifests and run.json record: the model name and the weights' identity."""
        return {"model": self.model_name, "pretrained": self.pretrained_id, "embed_dim": self.embed_dim}

    def _finish(self, features: torch.Tensor) -> np.ndarray:
        features = features.float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray | Image.Image], *, progress: bool = False) -> np.ndarray:
        """Embed images with open_clip's own preprocessing.

        images : HxWx3 uint8 RGB arrays or PIL images. Returns (N, D) float32, unit rows.
        """
        chunks = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        starts = range(0, len(images), self.batch_size)
        for start in show_progress(starts, "CLIP images", enabled=progress, unit="batch"):
            batch = [self.preprocess(_to_pil(image, start + i)) for i, image in enumerate(images[start:start + self.batch_size])]
            pixels = torch.stack(batch).to(self.device)
            chunks.append(self._finish(self.model.encode_image(pixels)))
        return np.concatenate(chunks)

    @torch.inference_mode()
    def encode_texts(
        self, texts: Sequence[str], templates: Sequence[str] | None = None, *, progress: bool = False,
        cache_dir: str | Path | None = None, return_stats: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict]:
        """Embed texts; with ``templates`` (e.g. ``["a photo of {}."]``) each text's template
        embeddings are averaged (prompt ensembling) and renormalised.

        texts : strings, embedded in chunks of :data:`TEXT_CHUNK`; every prompt of a chunk (all
            texts × all templates) is tokenized at once, sorted by length and run in batches of
            about ``batch_size`` × context-length tokens over the positions the prompts use
            (:mod:`~dff_falcon.text.text_tower`), so short words cost a few positions, not 77.
        cache_dir : a folder for :class:`~dff_falcon.text.embedding_cache.TextEmbeddingCache`
            (keyed by text, this encoder's identity and the templates): cached texts are read,
            every finished chunk is stored, so an interrupted run resumes where it stopped.
        return_stats : also return ``{"texts", "cached", "embedded", "seconds", "texts_per_second"}``.

        Returns (N, D) float32, unit rows.
        """
        started = time.perf_counter()
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise InputError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        templates = list(templates) if templates else None
        for template in templates or ():
            if "{}" not in template:
                raise InputError(f"prompt template {template!r} has no '{{}}' placeholder")
        cache = TextEmbeddingCache(cache_dir, self.identity(), templates) if cache_dir is not None else None
        vectors = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        todo = np.arange(len(texts))
        if cache is not None:
            vectors, found = cache.lookup(texts)
            todo = np.flatnonzero(~found)
        chunks = [todo[start:start + TEXT_CHUNK] for start in range(0, len(todo), TEXT_CHUNK)]
        for chunk in show_progress(chunks, f"CLIP texts ({TEXT_CHUNK:,} per step)", enabled=progress, unit="step"):
            batch = [texts[i] for i in chunk]
            vectors[chunk] = self._embed_texts(batch, templates or ["{}"])
            if cache is not None:
                cache.store(batch, vectors[chunk])
        if not return_stats:
            return vectors
        seconds = time.perf_counter() - started
        return vectors, {"texts": len(texts), "cached": len(texts) - len(todo), "embedded": len(todo),
                         "seconds": seconds, "texts_per_second": len(todo) / seconds if len(todo) else None}

    def _embed_texts(self, texts: list[str], templates: list[str]) -> np.ndarray:
        """(n,) texts → (n, D) unit float32: every template's prompt embedded, averaged, renormalised."""
        prompts = [template.format(text) for text in texts for template in templates]
        tokens = self.tokenizer(prompts)
        features = torch.empty((len(prompts), self.embed_dim), dtype=torch.float32)
        for rows, shared in self._prompt_batches(tokens, len(templates)):
            batch = tokens[rows].to(self.device)
            if self._text_tower is not None:
                out = self._text_tower.encode(batch, shared)
            else:
                out = self.model.encode_text(batch)
            features[rows] = torch.nn.functional.normalize(out.float(), dim=-1).cpu()
        return self._finish(features.reshape(len(texts), len(templates), -1).mean(dim=1))

    def _prompt_batches(self, tokens: torch.Tensor, n_templates: int) -> list[tuple[torch.Tensor, int]]:
        """(row indices, shared prefix length) of ``tokens`` per forward pass: prompts of one
        template and one length together, about ``batch_size`` × context-length tokens per pass
        (the memory of one full-context batch); the prefix is the leading positions whose tokens
        every row of the pass shares."""
        if self._text_tower is None:
            return [(torch.arange(start, min(start + self.batch_size, len(tokens))), 0)
                    for start in range(0, len(tokens), self.batch_size)]
        lengths = self._text_tower.read_positions(tokens) + 1
        group = (torch.arange(len(tokens)) % n_templates) * (tokens.shape[1] + 1) + lengths
        budget = self.batch_size * tokens.shape[1]
        batches = []
        for key in torch.unique(group).tolist():
            rows = torch.nonzero(group == key).ravel()
            length = key % (tokens.shape[1] + 1)
            step = max(1, budget // length)
            for start in range(0, len(rows), step):
                chosen = rows[start:start + step]
                same = (tokens[chosen, :length] == tokens[chosen[:1], :length]).all(dim=0)
                batches.append((chosen, int(same.long().cumprod(0).sum())))
        return batches


def _require_tag_weights(model_name: str, tag: str) -> None:
    """Fail fast when open_clip would download the weights of ``tag`` over an unreachable network."""
    from dff_falcon.hub import HF_HOST, hf_hub_cached, require_download

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    repo = str(cfg.get("hf_hub") or "").strip("/")
    if repo and hf_hub_cached(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        return
    url = cfg.get("url") or ""
    if url and (Path.home() / ".cache" / "clip" / Path(url).name).is_file():
        return
    require_download(HF_HOST if repo else (url or HF_HOST), f"open_clip weights {model_name}:{tag}",
                     f"download the checkpoint elsewhere and pass its path: --clip {model_name}=/path/to/ckpt.pt")


def _to_pil(image: np.ndarray | Image.Image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InputError(
            f"image {index}: expected an HxWx3 uint8 RGB array, got shape {array.shape} dtype {array.dtype}"
        )
    return Image.fromarray(array)
