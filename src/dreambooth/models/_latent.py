"""What the latent-space families (SD, SDXL, SD3, FLUX) share: loading from a folder or a single
file, an optional replacement VAE, and latents drawn from the cached VAE distribution."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dreambooth.models._folders import folder_variant
from dreambooth.models.spec import Encoded
from dreambooth.seeding import RowRandom

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@torch.no_grad()
def encode_latent_distribution(vae: nn.Module, pixels: Tensor) -> Encoded:
    """The VAE's latent distribution of images: its mean and std [b, c, h/8, w/8].

    The distribution, not one sample: each step draws a fresh sample from it, as encoding every
    step would, at the cost of encoding once.
    """
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    return {"latent_mean": dist.mean.float(), "latent_std": dist.std.float()}


def sample_latents(vae: nn.Module, encoded: Encoded, rng: RowRandom) -> Tensor:
    """A latent sample of each row, shifted and scaled as the VAE's config says the denoiser expects."""
    mean, std = encoded["latent_mean"], encoded["latent_std"]  # [b, c, h/8, w/8]
    latents = mean + std * rng.randn(tuple(mean.shape[1:])).to(mean)
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


def load_pipeline(
    cls, source: str, single_file_config: str | None, *, revision: str | None, variant: str | None, **kwargs
):
    """`cls.from_pretrained(source)`, or `from_single_file` for a .safetensors/.ckpt file, offline.

    A local folder some of whose components ship only variant weights (only `*.fp16.safetensors`, as
    a download with `variant="fp16"` leaves it) is read with that variant unless another is given.
    """
    if Path(source).suffix not in SINGLE_FILE_SUFFIXES:
        if variant is None and Path(source).is_dir():
            variant = folder_variant(Path(source))
        return cls.from_pretrained(source, revision=revision, variant=variant, **kwargs)
    try:  # configs come from `single_file_config` (a local diffusers folder) or the HF cache
        if single_file_config is not None:
            return cls.from_single_file(source, config=single_file_config, local_files_only=True, **kwargs)
        return cls.from_single_file(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        hint = (
            f"the folder given by --model-config ({single_file_config}) must be a diffusers {cls.__name__} "
            "folder of the same architecture" if single_file_config is not None
            else "pass --model-config DIR: a local diffusers folder of the same architecture (e.g. a "
            "download of stable-diffusion-v1-5/stable-diffusion-v1-5 or "
            "stabilityai/stable-diffusion-xl-base-1.0), which supplies the configs and tokenizers that a "
            "single file lacks"
        )
        raise ValueError(
            f"could not load single-file checkpoint {source!r} offline: {hint}. ({error})"
        ) from error


def load_vae(source: str | None, dtype: torch.dtype = torch.float32) -> dict:
    """`{"vae": AutoencoderKL}` from a folder, hub id or single file (e.g. an fp16-safe SDXL VAE), or {} for
    the model's own."""
    if source is None:
        return {}
    from diffusers import AutoencoderKL

    try:
        if Path(source).suffix in SINGLE_FILE_SUFFIXES:
            return {"vae": AutoencoderKL.from_single_file(source, local_files_only=True, torch_dtype=dtype)}
        subfolder = "vae" if (Path(source) / "vae" / "config.json").is_file() else None
        return {"vae": AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)}
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--vae {source!r} could not be loaded as a diffusers AutoencoderKL ({error})"
        ) from error


def sample_at(pipeline, resolution: int | None) -> None:
    """Make a UNet pipeline (SD, SDXL) train and sample at `resolution` pixels (None: as configured).

    Its pipelines default to the UNet config's `sample_size` (latents), which the exported model keeps.
    """
    if resolution is None:
        return
    pipeline.unet.register_to_config(sample_size=resolution // pipeline.vae_scale_factor)
    if hasattr(pipeline, "default_sample_size"):  # SDXL reads this copy
        pipeline.default_sample_size = resolution // pipeline.vae_scale_factor
