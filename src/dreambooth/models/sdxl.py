"""Stable Diffusion XL: one latent stage, two CLIP text encoders and size/crop micro-conditioning.

The UNet cross-attends to both encoders' penultimate hidden states side by side, and adds to its
time embedding the second encoder's pooled, projected output and six "time ids": the photo's
original size, the crop's top-left corner and the target size (Podell et al. 2023, Sec. 2.2).
The time ids are computed per image from its real size and crop, once, with its latents.
Trained with DDPM like SD (epsilon; v for v-prediction fine-tunes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionXLPipeline
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
from dreambooth.models.sd import CLIP_LORA_TARGETS, UNET_LORA_TARGETS
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
    "unet": UNET_LORA_TARGETS, "text_encoder": CLIP_LORA_TARGETS, "text_encoder_2": CLIP_LORA_TARGETS,
}
SINGLE_FILE_MARKER = "conditioner.embedders.1."
"""Key prefix of SDXL's second text encoder in the original single-file layout (SD 1.x/2.x have none)."""


@dataclass
class SDXLStage:
    """SDXL's UNet with its VAE and its two CLIP text encoders (the second with a projection)."""

    pipeline: StableDiffusionXLPipeline
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    objective: DDPMObjective
    name: str = "base"
    denoiser_name: str = "unet"
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_TARGETS))
    default_guidance: float = 5.0

    @property
    def tokenizers(self) -> tuple:
        return (self.pipeline.tokenizer, self.pipeline.tokenizer_2)

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def resolution(self) -> int:
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def tokenize(self, prompts: list[str]) -> Tokens:
        first, second = (tokenize(t, prompts) for t in self.tokenizers)
        return {"input_ids": first["input_ids"], "input_ids_2": second["input_ids"]}

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        return {
            **encode_latent_distribution(self.vae, pixels), "time_ids": time_ids(framing, self.resolution),
        }

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        return sample_latents(self.vae, encoded, rng)

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        # As StableDiffusionXLPipeline.encode_prompt: each encoder's penultimate hidden states,
        # concatenated along features; the pooled output is the second (projected) encoder's.
        sequences, pooled = [], None
        for name, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
            encoder = self.text_encoders[name]
            out = encoder(tokens[key].to(next(encoder.parameters()).device), output_hidden_states=True)
            sequences.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
        return TextConditioning(torch.cat(sequences, dim=-1), pooled)

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        added = {"text_embeds": text.pooled, "time_ids": encoded["time_ids"].to(text.pooled)}
        return self.denoiser(
            noisy, level, encoder_hidden_states=text.sequence, added_cond_kwargs=added
        ).sample


def time_ids(framing: Framing, resolution: int) -> Tensor:
    """SDXL's micro-conditioning [n, 6]: original (h, w), crop top-left (top, left), target (h, w)."""
    target = torch.tensor([resolution, resolution], dtype=torch.float32).expand(len(framing), 2)
    return torch.cat([framing.float(), target], dim=1)


def load_sdxl(
    source: str, *, single_file_config: str | None = None, revision: str | None = None,
    variant: str | None = None, vae: str | None = None, resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[SDXLStage]:
    """Load an SDXL pipeline (diffusers folder, hub id or single file), on CPU in `dtype`."""
    kwargs = dict(dtype=dtype, add_watermarker=False, **load_vae(vae, dtype))
    pipeline = load_pipeline(
        StableDiffusionXLPipeline, source, single_file_config, revision=revision, variant=variant, **kwargs
    )
    sample_at(pipeline, resolution)
    return [stage_from_pipeline(pipeline)]


def stage_from_pipeline(pipeline: StableDiffusionXLPipeline) -> SDXLStage:
    """Wrap a loaded pipeline as a trainable stage."""
    return SDXLStage(
        pipeline=pipeline, denoiser=pipeline.unet,
        text_encoders={"text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2},
        objective=DDPMObjective.from_config(pipeline.scheduler.config),
    )


def _load(source: ModelSource, cfg: RunConfig) -> list[SDXLStage]:
    model = cfg.model
    return load_sdxl(
        source.base, single_file_config=model.single_file_config, revision=model.revision,
        variant=model.variant, vae=model.vae, resolution=cfg.subject.resolution,
        dtype=DTYPES[cfg.weights_dtype],
    )


FAMILY = Family(
    name="sdxl", pipeline_classes=("StableDiffusionXLPipeline",), load=_load,
    text_encoders=("text_encoder", "text_encoder_2"), single_file_marker=SINGLE_FILE_MARKER, latent=True,
)
