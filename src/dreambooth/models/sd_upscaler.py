"""The Stable Diffusion x4 upscaler as the third stage of an IF cascade (256 -> 1024 px).

It denoises VAE latents at the low-res image's size, conditioned on the low-res image itself,
noise-augmented by the pipeline's `low_res_scheduler`, concatenated along channels (4 + 3 = 7),
with the augmentation level as `class_labels`. Training builds exactly that input from the real
photo seen at the SR stage's size, as `StableDiffusionUpscalePipeline` builds it at sampling, and
the cascade samples it at the top of the training range (`NOISE_LEVEL`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionUpscalePipeline
from torch import Tensor, nn

from dreambooth.models._latent import encode_latent_distribution, sample_latents
from dreambooth.models._lowres import augment, downsample
from dreambooth.models.ddpm import DDPMObjective
from dreambooth.models.sd import LORA_TARGETS, encode_clip_text
from dreambooth.models.spec import Encoded, Framing, TextConditioning, Tokens, tokenize
from dreambooth.seeding import RowRandom

NOISE_LEVELS: tuple[int, int] = (0, 100)
"""Augmentation levels of the low-res input drawn in training (inclusive)."""
NOISE_LEVEL = NOISE_LEVELS[1]
"""The level the cascade samples the upscaler at: IF's documented setting for its x4 stage."""


@dataclass(kw_only=True)
class UpscalerStage:
    """The x4 upscaler's UNet with its VAE and CLIP text encoder, fed the low-res image it upscales."""

    pipeline: StableDiffusionUpscalePipeline
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    objective: DDPMObjective
    low_resolution: int
    """Pixel size of its input: the previous stage's output."""
    noise_level_range: tuple[int, int] = NOISE_LEVELS
    name: str = "upscaler"
    denoiser_name: str = "unet"
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_TARGETS))
    default_guidance: float = 9.0  # StableDiffusionUpscalePipeline's default

    @property
    def resolution(self) -> int:
        return self.low_resolution * self.pipeline.vae_scale_factor

    @property
    def tokenizers(self) -> tuple:
        return (self.pipeline.tokenizer,)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.pipeline.vae}

    def tokenize(self, prompts: list[str]) -> Tokens:
        return tokenize(self.pipeline.tokenizer, prompts)

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        # The photo at the stage's size gives the latents; the same photo at the input size is what it
        # upscales.
        return {
            **encode_latent_distribution(self.pipeline.vae, pixels),
            "lowres": downsample(pixels.float(), self.low_resolution),
        }

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        return sample_latents(self.pipeline.vae, encoded, rng)

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        return encode_clip_text(self.text_encoders["text_encoder"], tokens)

    def condition(self, lowres: Tensor, rng: RowRandom) -> tuple[Tensor, Tensor]:
        """The noise-augmented low-res input [b, 3, h, w] and its augmentation level [b]."""
        return augment(lowres, self.pipeline.low_res_scheduler, self.noise_level_range, rng)

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        augmented, augmentation = self.condition(encoded["lowres"], rng)
        # [b, 4 + 3, h, w], as the pipeline builds it
        model_input = torch.cat([noisy, augmented.to(noisy)], dim=1)
        return self.denoiser(
            model_input, level, encoder_hidden_states=text.sequence, class_labels=augmentation
        ).sample


def load_upscaler(
    source: str, low_resolution: int, *, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> UpscalerStage:
    """Load a `StableDiffusionUpscalePipeline` on CPU in `dtype` as the stage after one of `low_resolution`
    px."""
    pipeline = StableDiffusionUpscalePipeline.from_pretrained(
        source, variant=variant, dtype=dtype, safety_checker=None, feature_extractor=None, watermarker=None
    )
    return UpscalerStage(
        pipeline=pipeline, denoiser=pipeline.unet, text_encoders={"text_encoder": pipeline.text_encoder},
        objective=DDPMObjective.from_config(pipeline.scheduler.config), low_resolution=low_resolution,
    )
