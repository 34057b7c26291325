"""The export formats, and which model families each serves.

- `diffusers`: the pipeline folder (`from_pretrained`); every family.
- `lora-diffusers`: `pytorch_lora_weights.safetensors`, what `load_lora_weights` reads; every family.
- `lora-kohya`: kohya's key layout (`lora_unet_*`, `lora_te1_*`, ...), what AUTOMATIC1111/Forge and
  ComfyUI read; SD, SDXL and FLUX (whose kohya names follow Black Forest Labs' checkpoint).
- `single-file`: one `.safetensors` in the original checkpoint layout, text encoders and VAE
  included; the same families.
"""

from __future__ import annotations

from dreambooth.export.lora_flux import export_lora_flux
from dreambooth.export.lora_kohya import export_lora_kohya

FORMATS = ("diffusers", "lora-diffusers", "lora-kohya", "single-file")
SINGLE_FILE_FAMILIES = ("sd", "sdxl")
KOHYA_WRITERS = {"sd": export_lora_kohya, "sdxl": export_lora_kohya, "flux": export_lora_flux}
"""Family -> the function that rewrites its diffusers-layout LoRA file in kohya's layout:
`(lora_file, out, *, base=pipeline, metadata=None) -> out`."""
KOHYA_FAMILIES = tuple(KOHYA_WRITERS)
LORA_FORMATS = ("lora-diffusers", "lora-kohya")


def families_of(fmt: str) -> tuple[str, ...] | None:
    """The families `fmt` serves, or None for all."""
    return {"single-file": SINGLE_FILE_FAMILIES, "lora-kohya": KOHYA_FAMILIES}.get(fmt)
