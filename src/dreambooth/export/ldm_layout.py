"""diffusers/transformers parameter names -> the original LDM/SGM names the UIs load.

Stable Diffusion 1.x/2.x (CompVis/Stability LDM) and SDXL (Stability "sgm") share these layouts:
the UNet numbers `input_blocks`, `middle_block` and `output_blocks`; the VAE uses `down.N.block.M`
and 1x1-convolution attention; OpenAI CLIP keeps transformers' names; OpenCLIP fuses q, k, v into
one `in_proj`. Every LDM name is derived by walking the model's own blocks (block count, layers per
block, where attention sits), in the order LDM's `UNetModel` builds them, and a parameter without
an LDM name is an error, never silently dropped. The single-file and kohya-LoRA writers both use it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# diffusers module path -> (LDM module path, its submodules' LDM names). A dict lists every
# submodule the block may have; None keeps the names below it (same in both, e.g. transformer blocks).
Renames = dict[str, tuple[str, "dict[str, str] | None"]]

_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_MLP = {"linear_1": "0", "linear_2": "2"}  # nn.Sequential(Linear, SiLU, Linear)
_VAE_RESNET = {
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def unet_renames(unet: nn.Module) -> Renames:
    """Walk the UNet's blocks in the order LDM's `UNetModel` numbers input/middle/output blocks."""
    renames: Renames = {
        "conv_in": ("input_blocks.0.0", None),
        "time_embedding": ("time_embed", _MLP),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
    }
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop ids
        renames["add_embedding"] = ("label_emb.0", _MLP)
    n = 1  # input_blocks.0 is conv_in; then one block per resnet (+ its attention), one per downsampler
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for j in range(len(block.resnets)):
            renames[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", _UNET_RESNET)
            if j < len(attentions):
                renames[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", None)
            n += 1
        if block.downsamplers:
            renames[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", None)
            n += 1
    if unet.mid_block is not None:  # resnet, then (attention, resnet) pairs
        renames["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
        for j in range(len(getattr(unet.mid_block, "attentions", ()))):
            renames[f"mid_block.attentions.{j}"] = (f"middle_block.{2 * j + 1}", None)
            renames[f"mid_block.resnets.{j + 1}"] = (f"middle_block.{2 * j + 2}", _UNET_RESNET)
    n = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for j in range(len(block.resnets)):
            renames[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", _UNET_RESNET)
            if j < len(attentions):
                renames[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", None)
            n += 1
        if block.upsamplers:  # LDM appends it to the level's last output block, after the attention
            index = 2 if attentions else 1
            renames[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{n - 1}.{index}.conv", None)
    return renames


def unet_state(unet: nn.Module) -> dict[str, Tensor]:
    return rename(unet.state_dict(), unet_renames(unet), "UNet")


def vae_state(vae: nn.Module) -> dict[str, Tensor]:
    renames: Renames = {"quant_conv": ("quant_conv", None), "post_quant_conv": ("post_quant_conv", None)}
    for part in ("encoder", "decoder"):
        coder = getattr(vae, part)
        for name, ldm in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            renames[f"{part}.{name}"] = (f"{part}.{ldm}", None)
        for j in range(len(coder.mid_block.resnets)):
            renames[f"{part}.mid_block.resnets.{j}"] = (f"{part}.mid.block_{j + 1}", _VAE_RESNET)
        for j in range(len(coder.mid_block.attentions)):
            renames[f"{part}.mid_block.attentions.{j}"] = (f"{part}.mid.attn_{j + 1}", _VAE_ATTENTION)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            renames[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        renames[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = len(vae.decoder.up_blocks) - 1 - i  # LDM numbers decoder levels from full resolution down
        for j in range(len(block.resnets)):
            renames[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        renames[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", None)
    state = rename(vae.state_dict(), renames, "VAE")
    # LDM's AttnBlock projects with 1x1 convolutions where diffusers uses Linear: [c, c] -> [c, c, 1, 1].
    return {k: v[:, :, None, None] if ".mid.attn_" in k and v.ndim == 2 else v for k, v in state.items()}


def text_encoder_layout(text_encoder: nn.Module) -> str:
    """Tell OpenAI CLIP ("clip": SD 1.x, SDXL's first) from OpenCLIP ("open_clip": SD 2.x, SDXL's second)."""
    act = text_encoder.config.hidden_act
    if act == "quick_gelu":
        return "clip"
    if act == "gelu":
        return "open_clip"
    raise ValueError(
        f"text encoder with hidden_act={act!r} is neither OpenAI CLIP (quick_gelu: SD 1.x, SDXL's "
        "text_encoder) nor OpenCLIP (gelu: SD 2.x, SDXL's text_encoder_2); the original layout has no place "
        "for it"
    )


def clip_state(text_encoder: nn.Module) -> dict[str, Tensor]:
    """OpenAI CLIP keeps transformers' names, under `text_model.` (which transformers >= 5.6 dropped)."""
    return {f"text_model.{k.removeprefix('text_model.')}": v for k, v in text_encoder.state_dict().items()}


def open_clip_state(text_encoder: nn.Module) -> dict[str, Tensor]:
    """OpenCLIP's names: fused q/k/v `in_proj`, `positional_embedding`, `ln_final`, `text_projection`."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    # OpenCLIP's positional embedding is a bare Parameter, not an nn.Embedding: no `.weight`.
    fused = {"positional_embedding": state.pop("embeddings.position_embedding.weight")}
    if "text_projection.weight" in state:  # CLIPTextModelWithProjection (SDXL's text_encoder_2)
        # OpenCLIP computes `pooled @ text_projection` with a [hidden, proj] Parameter; transformers'
        # nn.Linear stores [proj, hidden]. diffusers' and ComfyUI's readers transpose it back.
        fused["text_projection"] = state.pop("text_projection.weight").T
    renames: Renames = {
        "embeddings.token_embedding": ("token_embedding", None),
        "final_layer_norm": ("ln_final", None),
    }
    for n in range(text_encoder.config.num_hidden_layers):
        attn = f"encoder.layers.{n}.self_attn"
        for param in ("weight", "bias"):  # nn.MultiheadAttention keeps q, k, v stacked as one in_proj
            fused[f"transformer.resblocks.{n}.attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{attn}.{p}_proj.{param}") for p in "qkv"]
            )
        renames[f"encoder.layers.{n}"] = (f"transformer.resblocks.{n}", _OPEN_CLIP_LAYER)
    return {**fused, **rename(state, renames, "text encoder")}


def rename(state: dict[str, Tensor], renames: Renames, what: str) -> dict[str, Tensor]:
    """Rename each key by its longest module path in `renames`; refuse keys that have no LDM name."""
    out, missing = {}, []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if (name := ldm_module(module, renames)) is None:
            missing.append(key)
        else:
            out[f"{name}.{param}"] = tensor
    if missing:
        raise NotImplementedError(
            f"{len(missing)} {what} parameters have no name in the original LDM/SGM layout: {missing[:8]}; "
            "this exporter covers Stable Diffusion 1.x/2.x and SDXL pipelines only"
        )
    return out


def ldm_module(module: str, renames: Renames) -> str | None:
    """The LDM path of a diffusers module path, or None where the LDM layout has no such module."""
    path = module.split(".")
    for n in range(len(path), 0, -1):
        if (prefix := ".".join(path[:n])) in renames:
            ldm, inner = renames[prefix]
            rest = ".".join(path[n:])
            if inner is not None and rest:
                if rest not in inner:
                    return None
                rest = inner[rest]
            return f"{ldm}.{rest}" if rest else ldm
    return None


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def unprefixed(prefix: str, state: dict) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
