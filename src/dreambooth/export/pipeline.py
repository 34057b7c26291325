"""Writing a fine-tuned model at the end of training: LoRA weights, full pipelines, single files.

`dreambooth export` writes the same formats later from a run folder (export/command.py); both
call the same format functions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dreambooth.export.formats import KOHYA_WRITERS
from dreambooth.export.modelspec import export_metadata
from dreambooth.export.single_file import export_single_file
from dreambooth.files import with_usual_permissions
from dreambooth.layout import RunLayout
from dreambooth.models.lora import LORA_FILE, lora_modules, merge_lora, save_lora
from dreambooth.models.spec import Family, Stage

logger = logging.getLogger(__name__)


def export_run(
    stages: list[Stage], layout: RunLayout, family: Family, *, save_pipeline: bool,
    save_single_file: bool = False, run_info: dict | None = None,
) -> dict[str, str]:
    """Save every stage's LoRA adapters, then (if asked) each stage's full fp32 pipeline.

    LoRA adapters are merged into the base weights for the full pipeline, so it loads with
    `from_pretrained` alone. Untrained stages of a cascade are saved too: the pipeline folder is
    a complete model. LoRAs of families the UIs load are also written in kohya's layout, and
    with `save_single_file` the model as one checkpoint; `run_info` (run.json) becomes their
    header metadata. Returns what was written.
    """
    cascade, written = family.cascade, {}
    lora_metadata = export_metadata(run_info, lora=True) if run_info else None
    for stage in stages:
        if lora_modules(stage):
            out = layout.lora(stage.name, cascade)
            written[f"lora/{stage.name}"] = str(save_lora(stage, out))
            if (write_kohya := KOHYA_WRITERS.get(family.name)) is not None:
                kohya = write_kohya(
                    out / LORA_FILE, out / "lora_kohya.safetensors", base=stage.pipeline,
                    metadata=lora_metadata,
                )
                written[f"lora-kohya/{stage.name}"] = str(kohya)
    for stage in stages:
        if save_pipeline or save_single_file:
            to_fp32_cpu(stage.pipeline)  # first: adapters merge into fp32 weights, not a bf16 copy
            merge_lora(stage)
        if save_pipeline:
            out = layout.pipeline_stage(stage.name, cascade)
            stage.pipeline.save_pretrained(out, safe_serialization=True)
            written[f"pipeline/{stage.name}"] = str(out)
        if save_single_file:
            metadata = export_metadata(run_info) if run_info else None
            written["single-file"] = str(
                export_single_file(stage.pipeline, layout.single_file, torch.float16, metadata=metadata)
            )
    for name, path in written.items():
        with_usual_permissions(Path(path))
        logger.info("wrote %s: %s", name, path)
    return written


def to_fp32_cpu(pipeline) -> None:
    """Bring mixed-precision frozen parts back to fp32 on CPU for saving."""
    pipeline.to("cpu")
    for component in pipeline.components.values():
        if (
            isinstance(component, torch.nn.Module)
            and next(component.parameters(), torch.empty(0)).dtype != torch.float32
        ):
            component.to(torch.float32)
