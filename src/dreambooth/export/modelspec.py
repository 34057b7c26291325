"""The safetensors header of an exported file: SAI ModelSpec fields and the facts of the run that made it.

UIs (ComfyUI, AUTOMATIC1111/Forge, Civitai) read the `modelspec.*` keys to file a model or LoRA under
its base; the `dreambooth.*` keys record the run. ModelSpec 1.0.0: github.com/Stability-AI/ModelSpec.
Architecture ids and implementations as kohya sd-scripts writes them (`library/sai_model_spec.py`).
"""

from __future__ import annotations

import json
import logging
from datetime import date

from diffusers import DiffusionPipeline

from dreambooth import __version__
from dreambooth.export.ldm_layout import text_encoder_layout

logger = logging.getLogger(__name__)

WRITER = f"dreambooth {__version__}"
SPEC_VERSION = "1.0.0"
SDXL_BASE = "stable-diffusion-xl-v1-base"
FAMILY_ARCHITECTURES = {
    "sd": "stable-diffusion-v1",
    "sdxl": SDXL_BASE,
    "if": "deepfloyd-if",
    "sd3": "stable-diffusion-v3-medium",
    "flux": "flux-1-dev",
}
"""The ModelSpec architecture of each family, where the model itself is not at hand to tell (SD 2.x from
1.x, say: `modelspec_architecture`)."""
# ModelSpec's `implementation` is the codebase whose variable names the keys are.
IMPLEMENTATIONS = {
    "stable-diffusion-v1": "https://github.com/CompVis/stable-diffusion",
    "stable-diffusion-v2-512": "https://github.com/Stability-AI/stablediffusion",
    "stable-diffusion-v2-768-v": "https://github.com/Stability-AI/stablediffusion",
    SDXL_BASE: "https://github.com/Stability-AI/generative-models",
}
# Header fields a caller's metadata replaces. The exporter's other fields say what the weights are
# and how their keys are laid out (architecture, implementation, prediction type, kohya's `ss_*`):
# a caller's value for those is ignored, as a wrong one makes the UIs file the model under another base.
CALLER_FIELDS = ("modelspec.title", "modelspec.date", "modelspec.resolution")


def is_sdxl(pipeline: DiffusionPipeline) -> bool:
    return getattr(pipeline, "text_encoder_2", None) is not None


def modelspec_architecture(pipeline: DiffusionPipeline) -> str:
    """The SAI ModelSpec architecture id: SD v1, v2-512, v2-768-v, or SDXL base
    (stable-diffusion-xl-v1-base)."""
    if is_sdxl(pipeline):
        return SDXL_BASE
    if text_encoder_layout(pipeline.text_encoder) == "clip":
        return "stable-diffusion-v1"
    return "stable-diffusion-v2-768-v" if _prediction(pipeline) == "v" else "stable-diffusion-v2-512"


def kohya_base_version(pipeline: DiffusionPipeline) -> str:
    """kohya's `ss_base_model_version`; AUTOMATIC1111/Forge list a LoRA under SDXL if it starts with
    `sdxl_`."""
    if is_sdxl(pipeline):
        return "sdxl_base_v1-0"
    v2 = text_encoder_layout(pipeline.text_encoder) == "open_clip"
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if _prediction(pipeline) == "v" else "")


def base_fields(pipeline: DiffusionPipeline, title: str) -> dict[str, str]:
    """The ModelSpec fields of a file made from (or for) `pipeline`."""
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(pipeline),
        "modelspec.implementation": IMPLEMENTATIONS[modelspec_architecture(pipeline)],
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": _prediction(pipeline),
        "modelspec.date": date.today().isoformat(),
        "dreambooth.writer": WRITER,
    }


def export_metadata(
    run_info: dict, *, lora: bool = False, architecture: str | None = None, title: str | None = None
) -> dict[str, str]:
    """Header metadata of a file exported from a run (`run_info` is its run.json).

    Args:
        run_info: the run's run.json contents.
        lora: the file is a LoRA (its architecture gets the `/lora` suffix, as ModelSpec says).
        architecture: the model's ModelSpec architecture if known (e.g. from `modelspec_architecture`
            of the pipeline, which tells SD 2.x apart); default: the family's.
        title: `modelspec.title`; default: the identifier and class noun.
    """
    family = run_info["model"]["family"]
    resolution = max(run_info.get("resolution", {}).values(), default=None)
    architecture = (architecture or FAMILY_ARCHITECTURES.get(family, family)) + ("/lora" if lora else "")
    trigger = f"{run_info['identifier']} {run_info['class_noun']}"
    metadata = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or f"DreamBooth {trigger}",
        "modelspec.trigger_phrase": trigger,
        "dreambooth.base_model": str(run_info["model"]["source"]),
        "dreambooth.identifier": run_info["identifier"],
        "dreambooth.class_noun": run_info["class_noun"],
        "dreambooth.method": run_info.get("method", "full"),
        "dreambooth.steps": json.dumps(run_info.get("steps", {})),
        "dreambooth.version": __version__,
    }
    if resolution is not None:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
        metadata["dreambooth.resolution"] = str(resolution)
    return metadata


def merged(header: dict[str, str], metadata: dict[str, str] | None) -> dict[str, str]:
    """`header` plus the caller's `metadata` (identifier, trigger phrase, title, training resolution, ...).

    Keys the exporter sets itself keep its values, except `CALLER_FIELDS`.

    Raises:
        ValueError: a key or value that is not a str (safetensors headers hold nothing else).
    """
    metadata = metadata or {}
    wrong = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if wrong:
        raise ValueError(
            f"header metadata must map str to str (safetensors stores nothing else); not so for {wrong}"
        )
    kept = {
        k: (v, header[k]) for k, v in metadata.items()
        if k in header and k not in CALLER_FIELDS and v != header[k]
    }
    if kept:
        logger.debug("header: kept the exporter's value over the caller's (given, kept): %s", kept)
    return {**header, **{k: v for k, v in metadata.items() if k not in header or k in CALLER_FIELDS}}


def _prediction(pipeline: DiffusionPipeline) -> str:
    prediction = pipeline.scheduler.config.get("prediction_type", "epsilon")
    return "v" if prediction == "v_prediction" else prediction
