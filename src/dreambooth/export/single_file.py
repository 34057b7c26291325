"""Single-file checkpoints: the one `.safetensors` AUTOMATIC1111/Forge and ComfyUI load.

`export_single_file` writes a pipeline in its original key layout:
- Stable Diffusion 1.x/2.x (CompVis LDM, Stability SD 2.x): `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (SD 1.x CLIP) or
  `cond_stage_model.model.*` (SD 2.x OpenCLIP).
- SDXL (Stability "sgm"): the same UNet and VAE prefixes, `conditioner.embedders.0.transformer.*`
  (CLIP ViT-L) and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG).
diffusers reads either back with `from_single_file(path, config=<diffusers folder>)`. The renaming
walk lives in `ldm_layout`; kohya-format LoRAs in `lora_kohya` (re-exported here).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
from torch import Tensor

from dreambooth.export import ldm_layout as ldm
from dreambooth.export.lora_kohya import export_lora_kohya
from dreambooth.export.modelspec import base_fields, is_sdxl, merged
from dreambooth.models.lora import has_lora

__all__ = ["convert_to_ldm", "export_lora_kohya", "export_single_file"]


def export_single_file(
    pipeline: DiffusionPipeline,
    path: Path,
    dtype: torch.dtype = torch.float16,
    *,
    title: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `pipeline` as one LDM/SGM-layout `.safetensors` for AUTOMATIC1111/Forge and ComfyUI.

    Each text encoder's layout follows its activation: QuickGELU is OpenAI CLIP (SD 1.x, SDXL's
    first), GELU is OpenCLIP (SD 2.x, SDXL's second), written with fused `in_proj` attention.
    diffusers' SD 2.x text encoder ends at the penultimate layer, whose output is SD 2.x's
    conditioning, so an SD 2.x file has no 24th layer and no `text_projection`: AUTOMATIC1111 and
    ComfyUI load the text encoder non-strictly (ComfyUI logs the missing keys) and the conditioning
    uses neither. SDXL's second encoder is whole, `text_projection` included (its pooled output
    conditions the UNet); OpenCLIP's unused `logit_scale` has no counterpart in diffusers and is not written.
    The header carries SAI ModelSpec metadata (architecture, resolution, prediction type).

    Args:
        pipeline: a Stable Diffusion 1.x/2.x or SDXL (base) pipeline, LoRA adapters merged (`merge_lora`).
        path: the file to write; must end in `.safetensors`.
        dtype: floating-point dtype of the file (fp16 halves the size; fp32 is bit-exact).
        title: `modelspec.title`; defaults to the file name without its suffix.
        metadata: more header entries (str to str): identifier, `modelspec.trigger_phrase`, ... They
            replace the title, date and resolution; the fields that describe the weights
            (architecture, implementation, prediction type) stay the exporter's (`modelspec.merged`).

    Returns:
        `path`.

    Raises:
        ValueError: wrong suffix, unmerged LoRA adapters, a text encoder of neither layout, an SDXL
            pipeline without its first text encoder (the refiner), or metadata that is not str to str.
        NotImplementedError: a UNet, VAE or text-encoder parameter the original layout has no name
            for (e.g. a class embedding); the message names it.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoint {str(path)!r} must end in .safetensors, which the UIs list")
    header = merged(base_fields(pipeline, title or path.stem), metadata)
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in convert_to_ldm(pipeline).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=header)
    return path


def convert_to_ldm(pipeline: DiffusionPipeline) -> dict[str, Tensor]:
    """The pipeline's UNet, VAE and text encoder weights under their original LDM/SGM names.

    The tensors are the modules' own (no copies, except OpenCLIP's fused q/k/v and its transposed
    `text_projection`), on their device and in their dtype. Raises as `export_single_file` does.
    """
    encoders = ("text_encoder", "text_encoder_2") if is_sdxl(pipeline) else ("text_encoder",)
    if any(getattr(pipeline, name) is None for name in encoders):
        raise ValueError(
            "an SDXL pipeline without `text_encoder` (the refiner's layout) is not supported; "
            "the single-file exporter writes SDXL base checkpoints"
        )
    parts = ("unet", *encoders)
    if any(has_lora(getattr(pipeline, name)) for name in parts):
        raise ValueError("the pipeline has unmerged LoRA adapters: merge them first (models.lora.merge_lora)")
    return {
        **ldm.prefixed("model.diffusion_model.", ldm.unet_state(pipeline.unet)),
        **ldm.prefixed("first_stage_model.", ldm.vae_state(pipeline.vae)),
        **(_sdxl_text_state(pipeline) if is_sdxl(pipeline) else _sd_text_state(pipeline)),
    }


def _sd_text_state(pipeline: DiffusionPipeline) -> dict[str, Tensor]:
    if ldm.text_encoder_layout(pipeline.text_encoder) == "clip":
        return ldm.prefixed("cond_stage_model.transformer.", ldm.clip_state(pipeline.text_encoder))
    return ldm.prefixed("cond_stage_model.model.", ldm.open_clip_state(pipeline.text_encoder))


def _sdxl_text_state(pipeline: DiffusionPipeline) -> dict[str, Tensor]:
    """SDXL base: CLIP ViT-L as embedder 0 (transformers layout), OpenCLIP ViT-bigG as embedder 1."""
    layouts = {
        name: ldm.text_encoder_layout(getattr(pipeline, name)) for name in ("text_encoder", "text_encoder_2")
    }
    if layouts != {"text_encoder": "clip", "text_encoder_2": "open_clip"}:
        raise ValueError(
            f"SDXL's text encoders must be OpenAI CLIP then OpenCLIP (quick_gelu, then gelu); found {layouts}"
        )
    return {
        **ldm.prefixed("conditioner.embedders.0.transformer.", ldm.clip_state(pipeline.text_encoder)),
        **ldm.prefixed("conditioner.embedders.1.model.", ldm.open_clip_state(pipeline.text_encoder_2)),
    }
