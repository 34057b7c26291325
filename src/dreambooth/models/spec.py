"""What the trainer needs from a model, whatever its family.

A model is one or more `Stage`s: Stable Diffusion has one (a latent denoiser); an Imagen-like
cascade (DeepFloyd IF, the pocket model) has a base stage and a super-resolution stage, each
trained as a separate unit. A family implements `Stage` as a small dataclass plus functions;
families share no base class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from dreambooth.seeding import RowRandom

Encoded = dict[str, Tensor]
"""Frozen per-image encodings computed once before training (latent moments, or pixels)."""


@dataclass(frozen=True)
class LoraTargets:
    """Module names (peft `target_modules`) that get LoRA adapters."""

    unet: tuple[str, ...]
    text_encoder: tuple[str, ...]


class Stage(Protocol):
    """One trainable denoiser and what the training step needs around it.

    The modules are the very objects inside `pipeline`, so the stock diffusers pipeline samples
    the weights being trained (validation) and saves them (export).
    """

    name: str
    """'base' (text-to-image) or 'sr' (super-resolution)."""
    resolution: int
    """Pixel size of the images this stage generates and is trained on."""
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object
    """A DDPMScheduler carrying the training noise schedule and `prediction_type`."""
    pipeline: object
    """The stock diffusers pipeline that samples this stage."""
    lora_targets: LoraTargets
    default_guidance: float
    """Classifier-free guidance this family samples with by default."""

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules that never train (e.g. the VAE), by name."""
        ...

    def encode_images(self, pixels: Tensor) -> Encoded:
        """Frozen, deterministic encodings of images [b, 3, h, w] in [-1, 1]: cacheable."""
        ...

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        """The clean diffusion input x0 [b, c, h', w'] of a batch of encodings."""
        ...

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """Text conditioning [b, seq, d] of tokenized prompts, as the pipeline computes it."""
        ...

    def predict(self, noisy: Tensor, t: Tensor, text: Tensor, encoded: Encoded, rng: RowRandom) -> Tensor:
        """The denoiser's prediction (epsilon, v or x0 per the scheduler) [b, c, h', w']."""
        ...


def tokenize(tokenizer, prompts: list[str]) -> dict[str, Tensor]:
    """Tokenize prompts exactly as the diffusers pipelines do (pad and truncate to 77)."""
    out = tokenizer(
        prompts, padding="max_length", max_length=min(tokenizer.model_max_length, 77),
        truncation=True, return_tensors="pt",
    )
    return {"input_ids": out.input_ids, "attention_mask": out.attention_mask}


def training_target(noise_scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the denoiser must predict: follows the scheduler's `prediction_type`."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")


def frozen_modules(stage: Stage, train_text_encoder: bool) -> list[nn.Module]:
    """The modules that do not train in a run: the family's frozen parts, and a frozen text encoder."""
    return [*stage.frozen_modules().values(), *([] if train_text_encoder else [stage.text_encoder])]
