"""Embedders behind small protocols, and the DINO and CLIP ones the paper scores with.

The metrics in :mod:`dreambooth.eval.metrics` only see ``[n, d]`` tensors; anything that
implements :class:`ImageEmbedder` / :class:`TextEmbedder` / :class:`PerceptualDistance` can
fill the table (the pocket world brings its own). All embeddings are float32 on the CPU.

Choices the paper leaves open (Ruiz et al. 2023 only name the models):

- *DINO*: ``facebook/dino-vits16`` through ``ViTModel`` without the pooler; the embedding is
  the CLS token of ``last_hidden_state`` (the DINO repository's ``eval_knn`` features).
  Preprocessing as DINO's public evaluations: resize the shorter side to 256 (bicubic; in
  general crop x 256/224), centre-crop 224, ImageNet mean and std. The Hugging Face image
  processor instead squashes the whole image to 224 x 224, which changes the aspect ratio.
- *CLIP*: ``openai/clip-vit-base-patch32``; the projected embeddings (``pooler_output`` of
  ``get_image_features`` / ``get_text_features`` in transformers 5). Preprocessing as
  OpenAI's ``clip.load``: shorter side to the model's input size (bicubic), centre crop,
  CLIP's own mean and std. Texts are truncated to the model's 77 tokens.
- Resizing uses PIL's bicubic filter, as torchvision does on PIL images; the long side is
  truncated to an integer (``int(size * long / short)``) and the crop offsets rounded, as in
  torchvision's ``Resize`` and ``CenterCrop``.
- Models run in fp32 in eval mode, in batches of 32, under ``torch.inference_mode``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase, ViTModel

from dreambooth.config import DEFAULT_CLIP, DEFAULT_DINO

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BATCH_SIZE = 32


class ImageEmbedder(Protocol):
    """Maps images to embedding vectors; the metrics compare them by cosine."""

    name: str
    """Hub id or path of the model, recorded in the report."""

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Return ``[n, d]`` float32 CPU embeddings of ``n`` images."""
        ...


class TextEmbedder(Protocol):
    """Maps texts to embedding vectors in the same space as an :class:`ImageEmbedder`."""

    name: str

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Return ``[n, d]`` float32 CPU embeddings of ``n`` texts."""
        ...


class ImageTextEmbedder(ImageEmbedder, TextEmbedder, Protocol):
    """A joint image-text embedder (CLIP): CLIP-I and CLIP-T."""


class PerceptualDistance(Protocol):
    """A perceptual distance between images (LPIPS): DIV."""

    name: str

    def pairwise_distances(self, images: Sequence[Image.Image]) -> Tensor:
        """Return the symmetric ``[n, n]`` float32 CPU matrix of distances, zero diagonal."""
        ...


@dataclass(frozen=True)
class Preprocess:
    """Resize-then-centre-crop preprocessing to a normalised ``[n, 3, crop, crop]`` batch."""

    resize: int
    """Length of the shorter side after the bicubic resize."""
    crop: int
    """Side of the square centre crop."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def dino_preprocess(crop: int = 224) -> Preprocess:
    """DINO's evaluation preprocessing: shorter side to crop x 256/224, crop, ImageNet stats."""
    return Preprocess(resize=round(crop * 256 / 224), crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def clip_preprocess(crop: int = 224) -> Preprocess:
    """CLIP's preprocessing: shorter side to the input size, centre crop, CLIP stats."""
    return Preprocess(resize=crop, crop=crop, mean=CLIP_MEAN, std=CLIP_STD)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that the shorter side is ``size``, keeping the aspect ratio."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_size = (size, new_long) if w <= h else (new_long, size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def centre_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of a centred ``crop x crop`` square."""
    left = round((width - crop) / 2.0)  # round half to even, as torchvision's CenterCrop
    top = round((height - crop) / 2.0)
    return left, top, left + crop, top + crop


def to_pixel_values(images: Sequence[Image.Image], spec: Preprocess) -> Tensor:
    """Preprocess PIL images into a normalised float32 batch ``[n, 3, crop, crop]``."""
    arrays = []
    for image in images:
        resized = resize_shorter_side(image.convert("RGB"), spec.resize)
        cropped = resized.crop(centre_crop_box(*resized.size, spec.crop))
        arrays.append(np.asarray(cropped, dtype=np.float32) / 255.0)  # [crop, crop, 3]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [n, 3, crop, crop]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


T = TypeVar("T")


def _batched(items: Sequence[T], embed: Callable[[Sequence[T]], Tensor]) -> Tensor:
    chunks = [embed(items[i : i + BATCH_SIZE]) for i in range(0, len(items), BATCH_SIZE)]
    return torch.cat(chunks).float().cpu() if chunks else torch.empty(0, 0)


class DinoEmbedder:
    """DINO ViT image embedder: the CLS token of the last hidden state."""

    def __init__(self, model: ViTModel, name: str, device: torch.device | str = "cpu") -> None:
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.name = name
        self.device = torch.device(device)
        self.preprocess = dino_preprocess(model.config.image_size)

    @torch.inference_mode()
    def _embed(self, images: Sequence[Image.Image]) -> Tensor:
        pixels = to_pixel_values(images, self.preprocess).to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]  # [b, d]

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Return ``[n, d]`` CLS embeddings."""
        return _batched(images, self._embed)


class ClipEmbedder:
    """CLIP image and text embedder: projected embeddings, L2-normalised."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.preprocess = clip_preprocess(model.config.vision_config.image_size)
        self.max_length = model.config.text_config.max_position_embeddings

    @torch.inference_mode()
    def _embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        pixels = to_pixel_values(images, self.preprocess).to(self.device)
        out = self.model.get_image_features(pixel_values=pixels).pooler_output  # [b, proj]
        return torch.nn.functional.normalize(out, dim=-1)

    @torch.inference_mode()
    def _embed_texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).pooler_output  # [b, proj]
        return torch.nn.functional.normalize(out, dim=-1)

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Return ``[n, proj]`` unit-norm image embeddings."""
        return _batched(images, self._embed_images)

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Return ``[n, proj]`` unit-norm text embeddings."""
        return _batched(texts, self._embed_texts)


def _load_error(what: str, name_or_path: str, flag: str, err: Exception | None) -> Exception:
    message = (
        f"could not load the {what} model {name_or_path!r}. Offline, pass a local folder instead "
        f"({flag} /path/to/folder: a hub snapshot or a folder written by save_pretrained)"
        + (f"; loader said: {err}" if err else "")
    )
    return FileNotFoundError(message)


def _resolve(name_or_path: str, what: str, flag: str) -> str:
    """Expand ``~``; a path that is not a folder fails at once instead of being tried as a hub id."""
    path = os.path.expanduser(name_or_path)
    if name_or_path.startswith((".", "~", os.sep)) and not os.path.isdir(path):
        raise _load_error(what, name_or_path, flag, None)
    return path


def load_dino(
    name_or_path: str = DEFAULT_DINO, device: torch.device | str = "cpu", flag: str = "--eval.dino"
) -> DinoEmbedder:
    """Load a DINO ViT by hub id or local path.

    Args:
        name_or_path: Hub id (e.g. ``facebook/dino-vits16``) or a local model folder.
        device: Device to run the model on.
        flag: How the caller lets users set the model; named in the error message.

    Returns:
        The embedder, fp32, in eval mode.

    Raises:
        FileNotFoundError: If the model is neither a local folder nor loadable from the hub
            (e.g. offline without a cached copy); the message says to pass a local path.
    """
    path = _resolve(name_or_path, "DINO", flag)
    try:
        model = ViTModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    except OSError as err:
        raise _load_error("DINO", name_or_path, flag, err) from err
    return DinoEmbedder(model, name_or_path, device)


def load_clip(
    name_or_path: str = DEFAULT_CLIP, device: torch.device | str = "cpu", flag: str = "--eval.clip"
) -> ClipEmbedder:
    """Load a CLIP model and its tokenizer by hub id or local path.

    Args:
        name_or_path: Hub id (e.g. ``openai/clip-vit-large-patch14``) or a local model folder.
        device: Device to run the model on.
        flag: How the caller lets users set the model; named in the error message.

    Returns:
        The embedder, fp32, in eval mode.

    Raises:
        FileNotFoundError: If the model or its tokenizer cannot be loaded; the message says
            to pass a local path.
    """
    path = _resolve(name_or_path, "CLIP", flag)
    try:
        model = CLIPModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _load_error("CLIP", name_or_path, flag, err) from err
    return ClipEmbedder(model, tokenizer, name_or_path, device)


def image_digest(image: Image.Image) -> str:
    """A content hash of an image's pixels (mode, size and bytes), independent of its file."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """In-memory cache of image embeddings keyed by (embedder name, pixel hash).

    Keep one across evaluations (e.g. during training) so that the subject photos are
    embedded once per embedder.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[str, str], Tensor] = {}

    def embed(self, embedder: ImageEmbedder, images: Sequence[Image.Image]) -> Tensor:
        """Embed ``images`` with ``embedder``, reusing stored rows; returns ``[n, d]``."""
        keys = [(embedder.name, image_digest(im)) for im in images]
        missing = [i for i, key in enumerate(keys) if key not in self._store]
        if missing:
            fresh = embedder.embed_images([images[i] for i in missing])  # [m, d]
            for row, i in zip(fresh, missing):
                self._store[keys[i]] = row
        return torch.stack([self._store[key] for key in keys])
