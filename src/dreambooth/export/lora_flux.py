"""kohya-layout FLUX.1 LoRAs (`lora_unet_double_blocks_0_img_attn_qkv`, ...), what ComfyUI and Forge load.

kohya sd-scripts names FLUX LoRA modules after Black Forest Labs' reference implementation, the
layout of `flux1-dev.safetensors`, with `.` -> `_`. Some of its linear layers fuse several of
diffusers': a double block computes the image stream's q, k, v in one `img_attn.qkv` (the text
stream's in `txt_attn.qkv`), and a single block its q, k, v and MLP input in one `linear1`. Adapters
on the separate diffusers layers become one adapter on the fused layer, exactly: its down matrix
stacks the parts' A matrices and its up matrix holds their B matrices on the block diagonal (a
zero block for a part without adapter), so its rank and alpha are n times the parts' and
alpha/rank is theirs. kohya writes this layout for `split_qkv`, and diffusers' reader
(`lora_conversion_utils._convert_kohya_flux_lora_to_diffusers`) recognises it and splits it back
exactly. The widths of the parts come from the model itself, not from FLUX.1's constants. CLIP's
adapters are written as `lora_te1_*`, as kohya names FLUX's CLIP-L.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import date
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from dreambooth.export.ldm_layout import unprefixed
from dreambooth.export.lora_kohya import _kohya_alpha, _kohya_modules, _peft_pairs
from dreambooth.export.modelspec import WRITER, merged

UNET_PREFIX, CLIP_PREFIX = "lora_unet_", "lora_te1_"
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
"""Original name in `double_blocks.N` -> the diffusers modules in `transformer_blocks.N` it fuses, in its
output order."""
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
"""Original name in `single_blocks.N` -> the diffusers modules in `single_transformer_blocks.N` it fuses."""
OUTSIDE_BLOCKS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
"""Original name -> diffusers module, for the layers outside the blocks."""
SWAPPED = {"final_layer.adaLN_modulation.1"}
"""Layers whose outputs are (shift, scale) in the original and (scale, shift) in diffusers."""
FINAL_LAYERS = ("final_layer.",)
"""diffusers' reader ignores these layers' alphas: they are written with the scale folded into up and alpha =
rank."""
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
"""ModelSpec's `implementation` of the original FLUX.1 layout, as kohya writes it."""


def export_lora_flux(lora_file: Path, out: Path, *, base, metadata: dict[str, str] | None = None) -> Path:
    """Rewrite a diffusers-format FLUX.1 LoRA in kohya's layout, for ComfyUI, Forge and kohya.

    Args:
        lora_file: `pytorch_lora_weights.safetensors` from `FluxPipeline.save_lora_weights` (transformer and
            CLIP adapters, peft key names, adapter configs in the header).
        out: The kohya file to write (`.safetensors`).
        base: The FluxPipeline the LoRA was trained on: it gives the block counts and the widths of
            the fused layers' parts, and the header's architecture ([dev] or [schnell]).
        metadata: More header entries (str to str): identifier, trigger phrase, ...

    Returns:
        `out`.

    Raises:
        ValueError: `out` does not end in `.safetensors`, or the file holds no LoRA weights.
        NotImplementedError: adapters on modules the original layout has no name for, on T5, DoRA,
            per-module rank/alpha patterns, or parts of one fused layer with different ranks.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"kohya LoRA {str(out)!r} must end in .safetensors")
    state = load_file(lora_file)
    with safe_open(lora_file, "pt") as f:
        configs = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    unknown = sorted({k.split(".")[0] for k in state} - {"transformer", "text_encoder"})
    if unknown:
        raise NotImplementedError(
            f"{lora_file}: LoRA parts {unknown} have no kohya FLUX prefix (T5 is never trained here)"
        )
    kohya: dict[str, Tensor] = {}
    pairs = _peft_pairs(unprefixed("transformer.", state), "transformer")
    alpha_of = lambda rank: _kohya_alpha(unprefixed("transformer.", configs), rank)  # noqa: E731
    for name, parts in _original_layers(base.transformer).items():
        if any(p in pairs for p in parts):
            kohya |= _fused(name, [(p, pairs.pop(p, None)) for p in parts], base.transformer, alpha_of)
    if pairs:
        raise NotImplementedError(
            f"{len(pairs)} transformer LoRA modules have no name in the original FLUX layout: "
            f"{sorted(pairs)[:8]}"
        )
    clip = _peft_pairs(unprefixed("text_encoder.", state), "text_encoder")
    names = _kohya_modules(list(clip), "text_encoder", None)
    for module, (down, up) in clip.items():
        name = CLIP_PREFIX + names[module].replace(".", "_")
        alpha = _kohya_alpha(unprefixed("text_encoder.", configs), down.shape[0])
        kohya |= _module(name, down, up, alpha)
    if not kohya:
        raise ValueError(f"{lora_file} holds no LoRA weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, out, metadata=merged(_header(kohya, base, out.stem), metadata))
    return out


def _original_layers(transformer) -> dict[str, tuple[str, ...]]:
    """Every original layer name -> the full diffusers module paths it fuses, for this model's block
    counts."""
    config = transformer.config
    layers = {}
    for i in range(config.num_layers):
        layers |= {
            f"double_blocks.{i}.{n}": tuple(f"transformer_blocks.{i}.{p}" for p in ps)
            for n, ps in DOUBLE_BLOCK.items()
        }
    for i in range(config.num_single_layers):
        layers |= {
            f"single_blocks.{i}.{n}": tuple(f"single_transformer_blocks.{i}.{p}" for p in ps)
            for n, ps in SINGLE_BLOCK.items()
        }
    return layers | {n: (p,) for n, p in OUTSIDE_BLOCKS.items()}


def _fused(
    original: str, parts: list[tuple[str, tuple[Tensor, Tensor] | None]], transformer, alpha_of
) -> dict[str, Tensor]:
    """The kohya module of original layer `original`, from the adapters of the diffusers modules whose outputs
    it concatenates."""
    name = UNET_PREFIX + original.replace(".", "_")
    ranks = {pair[0].shape[0] for _, pair in parts if pair is not None}
    if len(ranks) > 1:
        raise NotImplementedError(f"{name}: the fused parts' adapters have different ranks {sorted(ranks)}")
    (rank,) = ranks
    n, alpha = len(parts), alpha_of(rank)
    widths = [transformer.get_submodule(path).out_features for path, _ in parts]
    in_features = next(pair[0].shape[1] for _, pair in parts if pair is not None)
    sample = next(pair[0] for _, pair in parts if pair is not None)
    down = torch.zeros(n * rank, in_features, dtype=sample.dtype)   # [n r, in]: the parts' A stacked
    # [sum out, n r]: their B on the block diagonal
    up = torch.zeros(sum(widths), n * rank, dtype=sample.dtype)
    row = 0
    for j, ((_, pair), width) in enumerate(zip(parts, widths)):
        if pair is not None:
            a, b = pair
            down[j * rank : (j + 1) * rank] = a
            up[row : row + width, j * rank : (j + 1) * rank] = b
        row += width
    if original in SWAPPED:
        up = torch.cat(up.chunk(2, dim=0)[::-1])                    # (scale, shift) -> (shift, scale)
    if original.startswith(FINAL_LAYERS):
        return _module(name, down, up * (alpha / rank), float(rank))  # read without its alpha by diffusers
    return _module(name, down, up, n * alpha)


def _module(name: str, down: Tensor, up: Tensor, alpha: float) -> dict[str, Tensor]:
    return {
        f"{name}.lora_down.weight": down.contiguous(),
        f"{name}.lora_up.weight": up.contiguous(),
        f"{name}.alpha": torch.tensor(alpha, dtype=torch.float32),
    }


def _header(kohya: dict[str, Tensor], base, title: str) -> dict[str, str]:
    """ModelSpec and kohya header fields of a FLUX.1 LoRA, as kohya sd-scripts writes them."""
    dev = bool(base.transformer.config.guidance_embeds)
    size = base.default_sample_size * base.vae_scale_factor
    ranks = Counter(v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(float(v) for k, v in kohya.items() if k.endswith(".alpha"))
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("flux-1-dev" if dev else "flux-1-schnell") + "/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": date.today().isoformat(),
        "dreambooth.writer": WRITER,
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
        "ss_base_model_version": "flux1",
        "ss_v2": "False",
    }
