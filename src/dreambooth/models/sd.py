"""Stable Diffusion 1.x / 2.x: one latent-space stage with a CLIP text encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torch import Tensor, nn

from dreambooth.models.spec import Encoded, LoraTargets
from dreambooth.seeding import RowRandom

logger = logging.getLogger(__name__)

LORA_TARGETS = LoraTargets(
    unet=("to_q", "to_k", "to_v", "to_out.0"),
    text_encoder=("q_proj", "k_proj", "v_proj", "out_proj"),
)


@dataclass
class SDStage:
    """The denoising UNet of Stable Diffusion with its VAE and CLIP text encoder."""

    pipeline: StableDiffusionPipeline
    unet: nn.Module
    text_encoder: nn.Module
    noise_scheduler: DDPMScheduler
    name: str = "base"
    lora_targets: LoraTargets = LORA_TARGETS
    default_guidance: float = 7.5

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def resolution(self) -> int:
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Encoded:
        # Keep the latent distribution, not one sample: each step draws a fresh sample from it,
        # as encoding every step would, at the cost of encoding once.
        param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        return {"latent_mean": dist.mean.float(), "latent_std": dist.std.float()}

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        mean, std = encoded["latent_mean"], encoded["latent_std"]  # [b, 4, h/8, w/8]
        latents = mean + std * rng.randn(tuple(mean.shape[1:])).to(mean)
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        device = next(self.text_encoder.parameters()).device
        # Mirrors StableDiffusionPipeline.encode_prompt: a mask only where the encoder asks for one.
        mask = tokens["attention_mask"].to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tokens["input_ids"].to(device), attention_mask=mask)[0]

    def predict(self, noisy: Tensor, t: Tensor, text: Tensor, encoded: Encoded, rng: RowRandom) -> Tensor:
        return self.unet(noisy, t, encoder_hidden_states=text).sample


def load_sd(source: str, *, single_file_config: str | None = None, revision: str | None = None, variant: str | None = None) -> list[SDStage]:
    """Load a Stable Diffusion 1.x/2.x pipeline (diffusers folder, hub id or single file) in fp32."""
    kwargs = dict(safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
    if Path(source).suffix in (".safetensors", ".ckpt"):
        pipeline = _load_single_file(Path(source), single_file_config, kwargs)
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(source, revision=revision, variant=variant, **kwargs)
    return [stage_from_pipeline(pipeline)]


def stage_from_pipeline(pipeline: StableDiffusionPipeline) -> SDStage:
    """Wrap a loaded pipeline as a trainable stage."""
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    return SDStage(pipeline=pipeline, unet=pipeline.unet, text_encoder=pipeline.text_encoder, noise_scheduler=noise_scheduler)


def _load_single_file(path: Path, config: str | None, kwargs: dict) -> StableDiffusionPipeline:
    """from_single_file, offline: configs come from `config` (a local diffusers folder) or the HF cache."""
    try:
        if config is not None:
            return StableDiffusionPipeline.from_single_file(str(path), config=config, local_files_only=True, **kwargs)
        return StableDiffusionPipeline.from_single_file(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        hint = (
            f"the folder given by --model-config ({config}) must be a diffusers Stable Diffusion folder of the same architecture"
            if config is not None
            else "pass --model-config DIR: a local diffusers folder of the same architecture (e.g. a download of "
            "stable-diffusion-v1-5/stable-diffusion-v1-5), which supplies the configs and tokenizer that a single file lacks"
        )
        raise ValueError(f"could not load single-file checkpoint {str(path)!r} offline: {hint}. ({error})") from error
