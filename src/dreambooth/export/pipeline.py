"""Writing a fine-tuned model: LoRA weights for `load_lora_weights`, and full diffusers pipelines."""

from __future__ import annotations

import logging

import torch
from diffusers import StableDiffusionPipeline

from dreambooth.export.single_file import export_lora_kohya, export_single_file
from dreambooth.layout import RunLayout
from dreambooth.models.lora import has_lora, merge_lora, save_lora
from dreambooth.models.spec import Stage

logger = logging.getLogger(__name__)


def export_run(stages: list[Stage], layout: RunLayout, *, cascade: bool, save_pipeline: bool, save_single_file: bool = False) -> dict[str, str]:
    """Save every stage's LoRA adapters, then (if asked) each stage's full fp32 pipeline.

    LoRA adapters are merged into the base weights for the full pipeline, so it loads with
    `from_pretrained` alone. Untrained stages of a cascade are saved too: the pipeline folder is
    a complete model. Stable Diffusion LoRAs are also written in kohya's format, and with
    `save_single_file` the model as one checkpoint, for the common UIs. Returns what was written.
    """
    written: dict[str, str] = {}
    for stage in stages:
        if has_lora(stage.unet) or has_lora(stage.text_encoder):
            out = layout.lora(stage.name, cascade)
            written[f"lora/{stage.name}"] = str(save_lora(stage, out))
            if isinstance(stage.pipeline, StableDiffusionPipeline):
                kohya = export_lora_kohya(out / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors", base=stage.pipeline)
                written[f"lora-kohya/{stage.name}"] = str(kohya)
    for stage in stages:
        if save_pipeline or save_single_file:
            merge_lora(stage)
            _to_fp32_cpu(stage.pipeline)
        if save_pipeline:
            out = layout.pipeline_stage(stage.name, cascade)
            stage.pipeline.save_pretrained(out, safe_serialization=True)
            written[f"pipeline/{stage.name}"] = str(out)
        if save_single_file:
            written["single-file"] = str(export_single_file(stage.pipeline, layout.single_file))
    for name, path in written.items():
        logger.info("wrote %s: %s", name, path)
    return written


def _to_fp32_cpu(pipeline) -> None:
    """Bring mixed-precision frozen parts back to fp32 on CPU for saving."""
    pipeline.to("cpu")
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module) and next(component.parameters(), torch.empty(0)).dtype != torch.float32:
            component.to(torch.float32)
