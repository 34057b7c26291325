"""The export formats, and which model families each serves.

- `diffusers`: the pipeline folder (`from_pretrained`); every family.
- `lora-diffusers`: `pytorch_lora_weights.safetensors`, what `load_lora_weights` reads; every family.
- `lora-kohya`: kohya's key layout (`lora_unet_*`, `lora_te1_*`, ...), what AUTOMATIC1111/Forge and
  ComfyUI read; families whose original layout those UIs load.
- `single-file`: one `.safetensors` in the original checkpoint layout, text encoders and VAE
  included; the same families.
"""

from __future__ import annotations

FORMATS = ("diffusers", "lora-diffusers", "lora-kohya", "single-file")
SINGLE_FILE_FAMILIES = ("sd", "sdxl")
KOHYA_FAMILIES = ("sd", "sdxl")
LORA_FORMATS = ("lora-diffusers", "lora-kohya")


def families_of(fmt: str) -> tuple[str, ...] | None:
    """The families `fmt` serves, or None for all."""
    return {"single-file": SINGLE_FILE_FAMILIES, "lora-kohya": KOHYA_FAMILIES}.get(fmt)
