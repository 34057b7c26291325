"""Imagen-like pixel cascades in DeepFloyd IF format (real IF, and the built-in pocket model).

The base stage denoises pixels at 64x64 (IF) or 32x32 (pocket). The super-resolution stage
trains exactly as `IFSuperResolutionPipeline` samples: its input is the noisy high-res image
concatenated with the *real low-res image*, bilinearly upscaled and noise-augmented by the
pipeline's `image_noising_scheduler`, and the augmentation level is passed as `class_labels`.
(Two popular trainers feed the noisy target concatenated with itself and pass the timestep
instead, so their model meets different inputs at sampling time.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import IFPipeline, IFSuperResolutionPipeline
from torch import Tensor, nn

from dreambooth.config import SR_NOISE_LEVELS, RunConfig
from dreambooth.models.ddpm import DDPMObjective
from dreambooth.models.spec import (
    DTYPES,
    Encoded,
    Family,
    Framing,
    ModelSource,
    TextConditioning,
    Tokens,
    tokenize,
)
from dreambooth.seeding import RowRandom

LORA_TARGETS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),
    "text_encoder": ("q", "k", "v", "o"),
}
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
"""IF pipeline components the tool neither trains nor needs (the safety checker and its feature extractor, the watermarker)."""


def downsample(pixels: Tensor, size: int) -> Tensor:
    """The low-res view of high-res images [b, 3, H, W] -> [b, 3, size, size] (antialiased bicubic)."""
    return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def upscale(lowres: Tensor, size: int) -> Tensor:
    """Upscale as IFSuperResolutionPipeline does (bilinear, align_corners=True)."""
    return F.interpolate(lowres, (size, size), mode="bilinear", align_corners=True)


def preprocess_prompt(prompt: str) -> str:
    """The text IF's pipelines tokenize (`_text_preprocessing` without caption cleaning): lower-cased, stripped.

    T5 is case-sensitive, so training must see the same text or 'OHWX' trains other tokens than sampling uses.
    """
    return prompt.lower().strip()


def _encode_t5(text_encoder: nn.Module, tokens: Tokens) -> TextConditioning:
    # IFPipeline.encode_prompt passes the attention mask and takes the last hidden state.
    device = next(text_encoder.parameters()).device
    return TextConditioning(text_encoder(tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))[0])


def _epsilon(output: Tensor, channels: int) -> Tensor:
    # IF UNets output [prediction (epsilon, or v for the pocket model), variance] along channels;
    # the denoising loss is on the prediction.
    return output[:, :channels]


@dataclass(kw_only=True)
class _IFStage:
    """What both stages of a cascade share: a pipeline, its T5 text encoder, pixels as x0."""

    pipeline: IFPipeline | IFSuperResolutionPipeline
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    objective: DDPMObjective
    name: str
    default_guidance: float
    denoiser_name: str = "unet"
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_TARGETS))

    @property
    def tokenizers(self) -> tuple:
        return (self.pipeline.tokenizer,)

    @property
    def resolution(self) -> int:
        return self.pipeline.unet.config.sample_size

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {}

    def tokenize(self, prompts: list[str]) -> Tokens:
        return tokenize(self.pipeline.tokenizer, [preprocess_prompt(p) for p in prompts])

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        return encoded["pixels"]

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        return _encode_t5(self.text_encoders["text_encoder"], tokens)


@dataclass(kw_only=True)
class IFBaseStage(_IFStage):
    """The text-to-image base stage of a pixel cascade."""

    pipeline: IFPipeline
    name: str = "base"
    default_guidance: float = 7.0

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        return {"pixels": pixels.float()}

    def predict(self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom) -> Tensor:
        return _epsilon(self.denoiser(noisy, level, encoder_hidden_states=text.sequence).sample, noisy.shape[1])


@dataclass(kw_only=True)
class IFSuperResStage(_IFStage):
    """The super-resolution stage, conditioned on the noise-augmented low-res image and its level."""

    pipeline: IFSuperResolutionPipeline
    low_resolution: int
    noise_level_range: tuple[int, int] = SR_NOISE_LEVELS
    name: str = "sr"
    default_guidance: float = 4.0

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        # The low-res input is the real photo seen at the base stage's resolution.
        return {"pixels": pixels.float(), "lowres": downsample(pixels.float(), self.low_resolution)}

    def condition(self, lowres: Tensor, rng: RowRandom) -> tuple[Tensor, Tensor]:
        """Upscaled, noise-augmented low-res input [b, 3, H, W] and its augmentation level [b]."""
        low, high = self.noise_level_range  # inclusive: the pipeline samples at the top level (250)
        level = rng.randint(low, min(high, self.pipeline.image_noising_scheduler.config.num_train_timesteps - 1) + 1)
        upscaled = upscale(lowres, self.resolution)
        noise = rng.randn(tuple(upscaled.shape[1:])).to(upscaled)
        return self.pipeline.image_noising_scheduler.add_noise(upscaled, noise, level), level

    def predict(self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom) -> Tensor:
        augmented, augmentation = self.condition(encoded["lowres"], rng)
        model_input = torch.cat([noisy, augmented.to(noisy)], dim=1)  # [b, 6, H, W], as the pipeline builds it
        output = self.denoiser(model_input, level, encoder_hidden_states=text.sequence, class_labels=augmentation).sample
        return _epsilon(output, noisy.shape[1])


def load_if(
    source: str, sr_source: str | None = None, *, noise_level_range: tuple[int, int] = SR_NOISE_LEVELS, revision: str | None = None,
    variant: str | None = None, dtype: torch.dtype = torch.float32,
) -> list:
    """Load the stages of an IF cascade on CPU in `dtype`: the base from `source`, SR from `sr_source` if given."""
    base_pipe = IFPipeline.from_pretrained(source, revision=revision, variant=variant, dtype=dtype, **NO_SAFETY)
    stages: list = [IFBaseStage(**_components(base_pipe))]
    if sr_source is not None:
        sr_pipe = IFSuperResolutionPipeline.from_pretrained(sr_source, variant=variant, dtype=dtype, **NO_SAFETY)
        stages.append(
            IFSuperResStage(**_components(sr_pipe), low_resolution=stages[0].resolution, noise_level_range=noise_level_range)
        )
    return stages


def _components(pipeline: IFPipeline | IFSuperResolutionPipeline) -> dict:
    # Training noises with DDPM from the pipeline's config, whatever scheduler sampling is given.
    return dict(pipeline=pipeline, denoiser=pipeline.unet, text_encoders={"text_encoder": pipeline.text_encoder},
                objective=DDPMObjective.from_config(pipeline.scheduler.config))


def _load(source: ModelSource, cfg: RunConfig) -> list:
    levels = cfg.cascade.noise_level_range
    return load_if(source.base, source.sr, noise_level_range=levels, revision=cfg.model.revision, variant=cfg.model.variant,
                   dtype=DTYPES[cfg.weights_dtype])


FAMILY = Family(name="if", pipeline_classes=("IFPipeline",), load=_load, text_encoders=("text_encoder",), cascade=True,
                preprocess_prompt=preprocess_prompt)
