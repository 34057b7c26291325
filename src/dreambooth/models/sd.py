"""Stable Diffusion 1.x / 2.x: one latent-space stage with a CLIP text encoder, trained with DDPM."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor, nn

from dreambooth.config import RunConfig
from dreambooth.models._latent import (
    encode_latent_distribution,
    load_pipeline,
    load_vae,
    sample_at,
    sample_latents,
)
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

logger = logging.getLogger(__name__)

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_TARGETS = {"unet": UNET_LORA_TARGETS, "text_encoder": CLIP_LORA_TARGETS}


@dataclass
class SDStage:
    """The denoising UNet of Stable Diffusion with its VAE and CLIP text encoder."""

    pipeline: StableDiffusionPipeline
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    objective: DDPMObjective
    name: str = "base"
    denoiser_name: str = "unet"
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_TARGETS))
    default_guidance: float = 7.5

    @property
    def tokenizers(self) -> tuple:
        return (self.pipeline.tokenizer,)

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def resolution(self) -> int:
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def tokenize(self, prompts: list[str]) -> Tokens:
        return tokenize(self.pipeline.tokenizer, prompts)

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        return encode_latent_distribution(self.vae, pixels)

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        return sample_latents(self.vae, encoded, rng)

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        return encode_clip_text(self.text_encoders["text_encoder"], tokens)

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        return self.denoiser(noisy, level, encoder_hidden_states=text.sequence).sample


def encode_clip_text(encoder: nn.Module, tokens: Tokens) -> TextConditioning:
    """The last hidden states of a CLIP text encoder, as StableDiffusionPipeline.encode_prompt computes them
    (an attention mask only where the encoder's config asks for one)."""
    device = next(encoder.parameters()).device
    mask = (
        tokens["attention_mask"].to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    )
    return TextConditioning(encoder(tokens["input_ids"].to(device), attention_mask=mask)[0])


def load_sd(
    source: str, *, single_file_config: str | None = None, revision: str | None = None,
    variant: str | None = None, vae: str | None = None, resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[SDStage]:
    """Load a Stable Diffusion 1.x/2.x pipeline (diffusers folder, hub id or single file), on CPU in
    `dtype`."""
    kwargs = dict(safety_checker=None, requires_safety_checker=False, dtype=dtype, **load_vae(vae, dtype))
    pipeline = load_pipeline(
        StableDiffusionPipeline, source, single_file_config, revision=revision, variant=variant, **kwargs
    )
    sample_at(pipeline, resolution)
    return [stage_from_pipeline(pipeline)]


def stage_from_pipeline(pipeline: StableDiffusionPipeline) -> SDStage:
    """Wrap a loaded pipeline as a trainable stage."""
    return SDStage(
        pipeline=pipeline, denoiser=pipeline.unet, text_encoders={"text_encoder": pipeline.text_encoder},
        objective=DDPMObjective.from_config(pipeline.scheduler.config),
    )


def _load(source: ModelSource, cfg: RunConfig) -> list[SDStage]:
    model = cfg.model
    return load_sd(
        source.base, single_file_config=model.single_file_config, revision=model.revision,
        variant=model.variant, vae=model.vae, resolution=cfg.subject.resolution,
        dtype=DTYPES[cfg.weights_dtype],
    )


FAMILY = Family(
    name="sd", pipeline_classes=("StableDiffusionPipeline",), load=_load, text_encoders=("text_encoder",),
    single_file_marker="cond_stage_model.", latent=True,
)
