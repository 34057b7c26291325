"""The examples a stage trains on, encoded once, and the batches drawn from them.

Batches are a pure function of (seed, step, micro-step, global row): rows are drawn by epoch
permutations derived from the seed, and each row carries its own seed for noise and timesteps.
Nothing about data order has to be checkpointed, and any split of the global batch over
processes yields the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image
from torch import Tensor

from dreambooth.data.images import resize_center_crop, to_tensor
from dreambooth.models.spec import Encoded, Stage, tokenize
from dreambooth.seeding import derive_seed


@dataclass
class Examples:
    """Rows of one kind (subject photos or class images), encoded once; tensors on CPU."""

    encoded: Encoded
    """Per-image encodings, each [n, ...]."""
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class TrainingSet:
    instance: Examples
    classes: Examples | None = None
    text_cache: dict[str, Tensor] | None = None
    """Caption -> text embedding [seq, d], when the text encoder is frozen."""


@dataclass
class Batch:
    """Instance rows first, then class rows (prior preservation), as one forward pass."""

    encoded: Encoded
    seeds: list[int]
    n_instance: int
    n_class: int
    text: Tensor | None = None
    """Cached text embeddings [b, seq, d]; None when the text encoder runs (see `tokens`)."""
    tokens: dict[str, Tensor] | None = None

    def to(self, device: torch.device) -> Batch:
        move = lambda d: {k: v.to(device) for k, v in d.items()} if d is not None else None  # noqa: E731
        text = self.text.to(device) if self.text is not None else None
        return Batch(move(self.encoded), self.seeds, self.n_instance, self.n_class, text, move(self.tokens))


@torch.no_grad()
def encode_examples(stage: Stage, images: list[Image.Image], captions: list[str], *, flip: bool = False, chunk: int = 16) -> Examples:
    """Resize/crop images to the stage's resolution and encode them (both orientations if `flip`)."""
    pixels = to_tensor([resize_center_crop(image, stage.resolution) for image in images])  # [n, 3, r, r]
    if flip:  # a random flip is a uniform draw over both orientations
        pixels, captions = torch.cat([pixels, pixels.flip(-1)]), captions + captions
    parts = [stage.encode_images(pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)]
    encoded = {key: torch.cat([p[key].cpu() for p in parts]) for key in parts[0]}
    return Examples(encoded, list(captions))


@torch.no_grad()
def encode_captions(stage: Stage, captions: list[str], chunk: int = 64) -> dict[str, Tensor]:
    """Text embeddings of each distinct caption (plus the empty one, for caption dropout)."""
    unique = sorted(set(captions) | {""})
    cache: dict[str, Tensor] = {}
    for i in range(0, len(unique), chunk):
        part = unique[i : i + chunk]
        embeddings = stage.encode_text(tokenize(stage.tokenizer, part)).float().cpu()
        cache.update(zip(part, embeddings))
    return cache


def sample_batch(
    data: TrainingSet, tokenizer, *, step: int, micro: int, accumulation: int, rank: int, world: int,
    batch_size: int, seed: int, caption_dropout: float = 0.0,
) -> Batch:
    """This process's share of the global batch of (step, micro-step)."""
    global_size = batch_size * world
    rows = range(rank * batch_size, (rank + 1) * batch_size)
    position = (step * accumulation + micro) * global_size
    kinds = [("instance", data.instance)] + ([("class", data.classes)] if data.classes is not None else [])
    encoded_parts, captions, seeds = [], [], []
    for kind, examples in kinds:
        index = torch.tensor([_pick(len(examples), position + j, seed, kind) for j in rows])
        encoded_parts.append({key: value[index] for key, value in examples.encoded.items()})
        for j, i in zip(rows, index.tolist()):
            dropped = caption_dropout > 0 and _uniform(seed, "drop", kind, step, micro, j) < caption_dropout
            captions.append("" if dropped else examples.captions[i])
            seeds.append(derive_seed(seed, kind, step, micro, j))
    encoded = {key: torch.cat([part[key] for part in encoded_parts]) for key in encoded_parts[0]}
    n_class = batch_size if data.classes is not None else 0
    if data.text_cache is not None:
        return Batch(encoded, seeds, batch_size, n_class, text=torch.stack([data.text_cache[c] for c in captions]))
    return Batch(encoded, seeds, batch_size, n_class, tokens=tokenize(tokenizer, captions))


def _pick(n: int, position: int, seed: int, kind: str) -> int:
    """Row `position` of an endless sequence of epochs, each a fresh permutation of n examples."""
    epoch, offset = divmod(position, n)
    return int(_permutation(n, seed, kind, epoch)[offset])


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, kind: str, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, kind, "epoch", epoch)))


def _uniform(*parts: int | str) -> float:
    return float(torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(*parts))))
