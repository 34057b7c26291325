"""kohya-format LoRAs: the `lora_unet_*` / `lora_te*_*` files AUTOMATIC1111/Forge, ComfyUI and kohya load.

kohya sd-scripts names LoRA modules after the model it trains: the diffusers UNet for SD 1.x/2.x
(`lora_unet_down_blocks_0_...`), the original SGM UNet for SDXL (`lora_unet_input_blocks_4_1_...`,
the LDM path from `ldm_layout` with `.` -> `_`), and transformers' CLIP for the text encoders
(`lora_te_` for SD's one, `lora_te1_` / `lora_te2_` for SDXL's two).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from dreambooth.export import ldm_layout as ldm
from dreambooth.export.modelspec import base_fields, is_sdxl, kohya_base_version, merged

# diffusers LoRA part -> kohya's name prefix
SD_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def export_lora_kohya(
    lora_file: Path,
    out: Path,
    *,
    base: DiffusionPipeline | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Rewrite diffusers-format SD 1.x/2.x or SDXL LoRA weights in kohya's format, for the UIs and kohya.

    Modules are named as kohya names them (see the module docstring), with `lora_down` (A),
    `lora_up` (B) and `alpha`; the UIs scale by alpha / rank. Alpha comes from the adapter config
    that diffusers stores in the file's header (`lora_adapter_metadata`); without one it is the
    rank, which is what diffusers' `load_lora_weights` assumes for such a file.

    Args:
        lora_file: `pytorch_lora_weights.safetensors` from `save_lora_weights` (diffusers/PEFT keys).
        out: the kohya file to write (`.safetensors`).
        base: the pipeline the LoRA was trained on; required for SDXL, whose UNet names come from
            walking its blocks. If given, the header names its architecture (ModelSpec
            `<architecture>/lora`, and kohya's `ss_base_model_version` and `ss_v2`, by which
            AUTOMATIC1111 files LoRAs under SD 1.x, 2.x or SDXL); if not, the header is left
            empty, so AUTOMATIC1111 lists the LoRA under every model rather than mis-file it as SD 1.x.
        metadata: more header entries (str to str): identifier, trigger phrase, ...; needs `base`.
            As in `export_single_file`, the fields that describe the weights stay the exporter's.

    Returns:
        `out`.

    Raises:
        ValueError: `out` does not end in `.safetensors`, the file holds no LoRA weights, SDXL parts
            or `metadata` without `base`, or metadata that is not str to str.
        NotImplementedError: DoRA, per-module alpha patterns, parts the base has no kohya prefix
            for, or an SDXL UNet module without an LDM name (the message names it).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"kohya LoRA {str(out)!r} must end in .safetensors")
    if metadata and base is None:
        raise ValueError(
            "metadata needs base=: AUTOMATIC1111 files a LoRA with a header but no `ss_base_model_version` "
            "or `ss_v2` under SD 1.x, and those fields come from the base pipeline"
        )
    state = load_file(lora_file)
    with safe_open(lora_file, "pt") as f:
        adapter_configs = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    xl = base is not None and is_sdxl(base)
    parts = SDXL_PARTS if xl else SD_PARTS
    found = {k.split(".")[0] for k in state}
    if base is None and "text_encoder_2" in found:
        raise ValueError(
            f"{lora_file} is an SDXL LoRA (it has text_encoder_2 weights): pass base=<the SDXL pipeline>"
        )
    others = sorted(found - set(parts))
    if others:
        raise NotImplementedError(
            f"{lora_file}: LoRA parts {others} have no kohya prefix (it has {sorted(parts)})"
        )
    kohya: dict[str, Tensor] = {}
    for component, prefix in parts.items():
        config = ldm.unprefixed(f"{component}.", adapter_configs)
        pairs = _peft_pairs(ldm.unprefixed(f"{component}.", state), component)
        names = _kohya_modules(list(pairs), component, base if xl else None)
        for module, (down, up) in pairs.items():
            name = prefix + names[module].replace(".", "_")
            kohya[f"{name}.lora_down.weight"] = down.contiguous()  # [r, in]
            kohya[f"{name}.lora_up.weight"] = up.contiguous()  # [out, r]
            kohya[f"{name}.alpha"] = torch.tensor(_kohya_alpha(config, down.shape[0]), dtype=torch.float32)
    if not kohya:
        raise ValueError(f"{lora_file} holds no LoRA weights")
    header = merged(_lora_fields(kohya, base, out.stem), metadata) if base is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, out, metadata=header)
    return out


def _kohya_modules(modules: list[str], component: str, sdxl_base: DiffusionPipeline | None) -> dict[str, str]:
    """diffusers module path -> the module path kohya names it by (`.` still in place)."""
    if component != "unet":  # transformers >= 5.6 flattened CLIPTextModel; kohya keeps `text_model.`
        return {
            m: m if m.startswith(("text_model.", "text_projection")) else f"text_model.{m}" for m in modules
        }
    if sdxl_base is None:  # SD 1.x/2.x: kohya trains the diffusers UNet and keeps its names
        return {m: m for m in modules}
    renames = ldm.unet_renames(sdxl_base.unet)
    names = {m: ldm.ldm_module(m, renames) for m in modules}
    missing = [m for m, name in names.items() if name is None]
    if missing:
        raise NotImplementedError(
            f"{len(missing)} UNet LoRA modules have no name in SDXL's original (SGM) layout: {missing[:8]}"
        )
    return names


def _peft_pairs(part: dict[str, Tensor], component: str) -> dict[str, tuple[Tensor, Tensor]]:
    """module path -> (A [r, in], B [out, r]), from diffusers (old or new) or PEFT key names."""
    if part and not any(".lora_A." in k for k in part):
        convert = convert_unet_state_dict_to_peft if component == "unet" else convert_state_dict_to_peft
        part = convert(part)
    unknown = [k for k in part if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unknown:  # e.g. DoRA's lora_magnitude_vector, which kohya's plain LoRA cannot express
        raise NotImplementedError(f"{component} LoRA tensors {unknown[:3]} have no kohya LoRA equivalent")
    modules = [k.removesuffix(".lora_A.weight") for k in part if k.endswith(".lora_A.weight")]
    return {m: (part[f"{m}.lora_A.weight"], part[f"{m}.lora_B.weight"]) for m in modules}


def _kohya_alpha(config: dict, rank: int) -> float:
    """kohya scales by alpha / rank; PEFT by lora_alpha / rank, or lora_alpha / sqrt(rank) with rsLoRA."""
    if not config:
        return float(rank)
    if config.get("use_dora") or config.get("alpha_pattern") or config.get("rank_pattern"):
        raise NotImplementedError("DoRA and per-module alpha/rank patterns are not converted to kohya LoRA")
    alpha = float(config["lora_alpha"])
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _lora_fields(kohya: dict[str, Tensor], base: DiffusionPipeline, title: str) -> dict[str, str]:
    fields = base_fields(base, title)
    arch = fields["modelspec.architecture"]
    ranks = Counter(v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(float(v) for k, v in kohya.items() if k.endswith(".alpha"))
    xl = is_sdxl(base)
    return {
        **fields,
        "modelspec.architecture": f"{arch}/lora",  # ModelSpec's (and kohya's) name of a LoRA of `arch`
        # SDXL's UNet names are SGM's (generative-models); SD 1.x/2.x's are kohya's diffusers names.
        **({} if xl else {"modelspec.implementation": "https://github.com/kohya-ss/sd-scripts"}),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
        "ss_base_model_version": kohya_base_version(base),
        # kohya's SD 2.x flag (OpenCLIP text encoder); False for SD 1.x and SDXL, as kohya writes it.
        "ss_v2": str(not xl and ldm.text_encoder_layout(base.text_encoder) == "open_clip"),
    }
