"""What an exported file says about itself: run facts and SAI ModelSpec keys in the safetensors header.

UIs (ComfyUI, AUTOMATIC1111/Forge, Civitai) show the `modelspec.*` keys; the `dreambooth.*` keys
record the run that made the file.
"""

from __future__ import annotations

import json

from dreambooth import __version__

MODELSPEC_ARCHITECTURES = {
    "sd": "stable-diffusion-v1",
    "sdxl": "stable-diffusion-xl-v1-base",
    "if": "deepfloyd-if",
    "sd3": "stable-diffusion-v3-medium",
    "flux": "flux-1-dev",
}
"""SAI ModelSpec `modelspec.architecture` of each family, where the model itself is not at hand."""


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
    architecture = (architecture or MODELSPEC_ARCHITECTURES.get(family, family)) + ("/lora" if lora else "")
    trigger = f"{run_info['identifier']} {run_info['class_noun']}"
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
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
