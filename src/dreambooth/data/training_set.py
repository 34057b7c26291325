"""The examples a stage trains on, encoded once, and the batches drawn from them.

Batches are a pure function of (seed, step, micro-step, global row): rows are drawn by epoch
permutations derived from the seed, and each row carries its own seed for noise and timesteps.
Nothing about data order has to be checkpointed, and any split of the global batch over
processes yields the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image

from dreambooth.data.images import center_crop_framing, resize_center_crop, to_tensor
from dreambooth.devices import to_device
from dreambooth.models.spec import Encoded, Stage, TextConditioning, Tokens
from dreambooth.seeding import derive_seed


@dataclass
class Examples:
    """Rows of one kind (subject photos or class images), encoded once."""

    encoded: Encoded
    """Per-image encodings, each [n, ...]."""
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> Examples:
        return Examples({key: to_device(value, device) for key, value in self.encoded.items()}, self.captions)


@dataclass
class TrainingSet:
    instance: Examples
    classes: Examples | None = None
    text_cache: dict[str, TextConditioning] | None = None
    """Caption -> its (unbatched) text conditioning, when the text encoders are frozen."""

    def to(self, device: torch.device) -> TrainingSet:
        """The set on `device`, where the loop keeps it: a batch is then drawn without any host-device
        copy."""
        cache = self.text_cache and {caption: text.to(device) for caption, text in self.text_cache.items()}
        return TrainingSet(
            self.instance.to(device), self.classes.to(device) if self.classes is not None else None, cache
        )


@dataclass
class Batch:
    """Instance rows first, then class rows (prior preservation), as one forward pass."""

    encoded: Encoded
    seeds: list[int]
    n_instance: int
    n_class: int
    text: TextConditioning | None = None
    """Cached text conditioning of the rows; None when the text encoders run (see `tokens`)."""
    tokens: Tokens | None = None

    def to(self, device: torch.device) -> Batch:
        move = lambda d: {k: to_device(v, device) for k, v in d.items()} if d is not None else None  # noqa: E731
        text = self.text.to(device) if self.text is not None else None
        return Batch(move(self.encoded), self.seeds, self.n_instance, self.n_class, text, move(self.tokens))


ENCODE_PIXELS = 16 * 256 * 256
"""Pixels encoded per forward pass of `encode_images` by default: 16 images at 256 px, one at 1024 px
(a VAE's activations at 1024 px are ~2.5 GiB per image in bf16)."""


@torch.no_grad()
def encode_examples(
    stage: Stage, images: list[Image.Image], captions: list[str], *, flip: bool = False,
    chunk: int | None = None,
) -> Examples:
    """Resize/crop images to the stage's resolution and encode them (both orientations if `flip`).

    Each image's framing (original size, crop) is encoded with it, for families that condition on it.
    `chunk` images go through the encoder at once; None: as many as `ENCODE_PIXELS` allows.
    """
    chunk = chunk or max(1, min(16, ENCODE_PIXELS // stage.resolution**2))
    views = [(image, False) for image in images] + ([(image, True) for image in images] if flip else [])
    parts = []
    for i in range(0, len(views), chunk):  # a random flip is a uniform draw over both orientations
        part = views[i : i + chunk]
        pixels = to_tensor([resize_center_crop(image, stage.resolution) for image, _ in part])  # [n, 3, r, r]
        pixels = torch.stack([p.flip(-1) if flipped else p for p, (_, flipped) in zip(pixels, part)])
        framing = torch.tensor([
            center_crop_framing(image.size, stage.resolution, flipped=flipped) for image, flipped in part
        ])
        parts.append({key: value.cpu() for key, value in stage.encode_images(pixels, framing).items()})
    encoded = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return Examples(encoded, list(captions) + (list(captions) if flip else []))


@torch.no_grad()
def encode_captions(stage: Stage, captions: list[str], chunk: int = 64) -> dict[str, TextConditioning]:
    """Text conditioning of each distinct caption (plus the empty one, for caption dropout)."""
    unique = sorted(set(captions) | {""})
    cache: dict[str, TextConditioning] = {}
    for i in range(0, len(unique), chunk):
        part = unique[i : i + chunk]
        conditioning = stage.encode_text(stage.tokenize(part)).to("cpu", torch.float32)
        cache.update(zip(part, conditioning.unbind()))
    return cache


def sample_batch(
    data: TrainingSet, tokenize: Callable[[list[str]], Tokens], *, step: int, micro: int, accumulation: int,
    rank: int, world: int, batch_size: int, seed: int, caption_dropout: float = 0.0,
) -> Batch:
    """This process's share of the global batch of (step, micro-step)."""
    global_size = batch_size * world
    rows = range(rank * batch_size, (rank + 1) * batch_size)
    position = (step * accumulation + micro) * global_size
    kinds = [("instance", data.instance)] + ([("class", data.classes)] if data.classes is not None else [])
    encoded_parts, captions, seeds = [], [], []
    for kind, examples in kinds:
        index = [_pick(len(examples), position + j, seed, kind) for j in rows]
        encoded_parts.append({
            key: torch.stack([value[i] for i in index]) for key, value in examples.encoded.items()
        })
        for j, i in zip(rows, index):
            dropped = caption_dropout > 0 and _uniform(seed, "drop", kind, step, micro, j) < caption_dropout
            captions.append("" if dropped else examples.captions[i])
            seeds.append(derive_seed(seed, kind, step, micro, j))
    encoded = {key: torch.cat([part[key] for part in encoded_parts]) for key in encoded_parts[0]}
    n_class = batch_size if data.classes is not None else 0
    if data.text_cache is not None:
        return Batch(
            encoded, seeds, batch_size, n_class,
            text=TextConditioning.stack([data.text_cache[c] for c in captions]),
        )
    return Batch(encoded, seeds, batch_size, n_class, tokens=tokenize(captions))


def _pick(n: int, position: int, seed: int, kind: str) -> int:
    """Row `position` of an endless sequence of epochs, each a fresh permutation of n examples."""
    epoch, offset = divmod(position, n)
    return _permutation(n, seed, kind, epoch)[offset]


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, kind: str, epoch: int) -> tuple[int, ...]:
    return tuple(
        torch.randperm(
            n, generator=torch.Generator().manual_seed(derive_seed(seed, kind, "epoch", epoch))
        ).tolist()
    )


def _uniform(*parts: int | str) -> float:
    return float(torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(*parts))))
