"""Single-file checkpoints and kohya LoRAs: the formats AUTOMATIC1111/Forge, ComfyUI and kohya load.

- `export_single_file` writes a Stable Diffusion 1.x/2.x pipeline as one `.safetensors` in the
  original LDM key layout (CompVis SD 1.x, Stability SD 2.x): `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (SD 1.x CLIP) or
  `cond_stage_model.model.*` (SD 2.x OpenCLIP). diffusers reads it back with
  `StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)`.
- `export_lora_kohya` rewrites diffusers-format LoRA weights (`pytorch_lora_weights.safetensors`)
  with kohya's names (`lora_unet_*`, `lora_te_*`; `lora_down`, `lora_up`, `alpha`).

diffusers converts LDM -> diffusers only; its repository script for the other direction hard-codes
SD 1.5's four blocks and predates transformers 5's flattened `CLIPTextModel`. Here every LDM name is
derived by walking the model's own blocks (block count, layers per block, where attention sits), in
the order LDM's `UNetModel` builds them, and a parameter without an LDM name is an error, never
silently dropped.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import date
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dreambooth import __version__
from dreambooth.models.lora import has_lora

WRITER = f"dreambooth {__version__}"

# diffusers module path -> (LDM module path, its submodules' LDM names). A dict lists every
# submodule the block may have; None keeps the names below it (same in both, e.g. transformer blocks).
Renames = dict[str, tuple[str, "dict[str, str] | None"]]

_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def export_single_file(
    pipeline: StableDiffusionPipeline,
    path: Path,
    dtype: torch.dtype = torch.float16,
    *,
    title: str | None = None,
) -> Path:
    """Write `pipeline` as one LDM-layout `.safetensors` for AUTOMATIC1111/Forge and ComfyUI.

    The text encoder's layout follows its activation: QuickGELU is OpenAI CLIP (SD 1.x), GELU is
    OpenCLIP (SD 2.x, written with fused `in_proj` attention). diffusers' SD 2.x text encoder ends
    at the penultimate layer, whose output is SD 2.x's conditioning, so the file has no 24th layer
    and no `text_projection`: AUTOMATIC1111 and ComfyUI load the text encoder non-strictly (ComfyUI
    logs the missing keys) and the conditioning uses neither.
    The header carries SAI ModelSpec metadata (architecture, resolution, prediction type).

    Args:
        pipeline: a Stable Diffusion 1.x/2.x pipeline, LoRA adapters merged (`merge_lora`).
        path: the file to write; must end in `.safetensors`.
        dtype: floating-point dtype of the file (fp16 halves the size; fp32 is bit-exact).
        title: `modelspec.title`; defaults to the file name without its suffix.

    Returns:
        `path`.

    Raises:
        ValueError: wrong suffix, unmerged LoRA adapters, or a text encoder of neither layout.
        NotImplementedError: a UNet or VAE part the LDM layout has no name for (e.g. SDXL's
            added embeddings).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoint {str(path)!r} must end in .safetensors, which the UIs list")
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in convert_to_ldm(pipeline).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=_checkpoint_metadata(pipeline, title or path.stem))
    return path


def convert_to_ldm(pipeline: StableDiffusionPipeline) -> dict[str, Tensor]:
    """The pipeline's UNet, VAE and text encoder weights under their original LDM names.

    The tensors are the modules' own (no copies, except SD 2.x's fused q/k/v), on their device
    and in their dtype. Raises as `export_single_file` does.
    """
    if has_lora(pipeline.unet) or has_lora(pipeline.text_encoder):
        raise ValueError("the pipeline has unmerged LoRA adapters: merge them first (models.lora.merge_lora)")
    text = _clip_state if _text_encoder_layout(pipeline.text_encoder) == "clip" else _open_clip_state
    unet = _rename(pipeline.unet.state_dict(), _unet_renames(pipeline.unet), "UNet")
    return {
        **_prefixed("model.diffusion_model.", unet),
        **_prefixed("first_stage_model.", _vae_state(pipeline.vae)),
        **text(pipeline.text_encoder),
    }


def _text_encoder_layout(text_encoder: nn.Module) -> str:
    """Tell SD 1.x's OpenAI CLIP ("clip") from SD 2.x's OpenCLIP ViT-H ("open_clip") by the activation."""
    act = text_encoder.config.hidden_act
    if act == "quick_gelu":
        return "clip"
    if act == "gelu":
        return "open_clip"
    raise ValueError(
        f"text encoder with hidden_act={act!r} is neither SD 1.x's OpenAI CLIP (quick_gelu) nor SD 2.x's "
        "OpenCLIP (gelu); the original single-file layout has no place for it"
    )


def modelspec_architecture(pipeline: StableDiffusionPipeline) -> str:
    """The SAI ModelSpec architecture id of an SD 1.x/2.x pipeline (v1, v2-512 or v2-768-v)."""
    if _text_encoder_layout(pipeline.text_encoder) == "clip":
        return "stable-diffusion-v1"
    v = pipeline.scheduler.config.get("prediction_type") == "v_prediction"
    return "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"


def _unet_renames(unet: nn.Module) -> Renames:
    """Walk the UNet's blocks in the order LDM's `UNetModel` numbers input/middle/output blocks."""
    renames: Renames = {
        "conv_in": ("input_blocks.0.0", None),
        "time_embedding": ("time_embed", {"linear_1": "0", "linear_2": "2"}),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
    }
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


def _vae_state(vae: nn.Module) -> dict[str, Tensor]:
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
    state = _rename(vae.state_dict(), renames, "VAE")
    # LDM's AttnBlock projects with 1x1 convolutions where diffusers uses Linear: [c, c] -> [c, c, 1, 1].
    return {k: v[:, :, None, None] if ".mid.attn_" in k and v.ndim == 2 else v for k, v in state.items()}


def _clip_state(text_encoder: nn.Module) -> dict[str, Tensor]:
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; the LDM names keep it.
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    return _prefixed("cond_stage_model.transformer.text_model.", state)


def _open_clip_state(text_encoder: nn.Module) -> dict[str, Tensor]:
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    # OpenCLIP's positional embedding is a bare Parameter, not an nn.Embedding: no `.weight`.
    fused = {"positional_embedding": state.pop("embeddings.position_embedding.weight")}
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
    return _prefixed("cond_stage_model.model.", {**fused, **_rename(state, renames, "text encoder")})


def _rename(state: dict[str, Tensor], renames: Renames, what: str) -> dict[str, Tensor]:
    """Rename each key by its longest module path in `renames`; refuse keys that have no LDM name."""
    out, missing = {}, []
    for key, tensor in state.items():
        if (name := _ldm_name(key, renames)) is None:
            missing.append(key)
        else:
            out[name] = tensor
    if missing:
        raise NotImplementedError(
            f"{len(missing)} {what} parameters have no name in the original SD 1.x/2.x layout "
            f"(e.g. {missing[:3]}); this exporter covers Stable Diffusion 1.x/2.x pipelines only"
        )
    return out


def _ldm_name(key: str, renames: Renames) -> str | None:
    *path, param = key.split(".")
    for n in range(len(path), 0, -1):
        if (module := ".".join(path[:n])) in renames:
            ldm, inner = renames[module]
            rest = ".".join(path[n:])
            if inner is not None and rest:
                if rest not in inner:
                    return None
                rest = inner[rest]
            return ".".join(p for p in (ldm, rest, param) if p)
    return None


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _unprefixed(prefix: str, state: dict) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _checkpoint_metadata(pipeline: StableDiffusionPipeline, title: str) -> dict[str, str]:
    arch = modelspec_architecture(pipeline)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    prediction = pipeline.scheduler.config.get("prediction_type", "epsilon")
    # ModelSpec's `implementation` is the codebase whose variable names the keys are.
    repo = "CompVis/stable-diffusion" if arch == "stable-diffusion-v1" else "Stability-AI/stablediffusion"
    return {  # SAI ModelSpec 1.0.0 (github.com/Stability-AI/ModelSpec): read by UIs to pick settings
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": f"https://github.com/{repo}",
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else prediction,
        "modelspec.date": date.today().isoformat(),
        "dreambooth.writer": WRITER,
    }


def export_lora_kohya(lora_file: Path, out: Path, *, base: StableDiffusionPipeline | None = None) -> Path:
    """Rewrite diffusers-format SD 1.x/2.x LoRA weights in kohya's format, for the UIs and kohya.

    Names become `lora_unet_<diffusers module>` and `lora_te_text_model_<module>` with `lora_down`
    (A), `lora_up` (B) and `alpha`; the UIs scale by alpha / rank. Alpha comes from the adapter
    config that diffusers stores in the file's header (`lora_adapter_metadata`); without one it is
    the rank, which is what diffusers' `load_lora_weights` assumes for such a file.

    Args:
        lora_file: `pytorch_lora_weights.safetensors` from `save_lora_weights` (diffusers/PEFT keys).
        out: the kohya file to write (`.safetensors`).
        base: the pipeline the LoRA was trained on. If given, the header names its architecture
            (ModelSpec, and kohya's `ss_v2`, by which AUTOMATIC1111 files LoRAs under SD 1.x or 2.x);
            if not, the header is left empty, so AUTOMATIC1111 lists the LoRA under every model
            rather than mis-file it as SD 1.x.

    Returns:
        `out`.

    Raises:
        ValueError: `out` does not end in `.safetensors`, or the file holds no LoRA weights.
        NotImplementedError: DoRA, per-module alpha patterns, or parts other than UNet/text encoder.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"kohya LoRA {str(out)!r} must end in .safetensors")
    state = load_file(lora_file)
    with safe_open(lora_file, "pt") as f:
        adapter_configs = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    kohya: dict[str, Tensor] = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        config = _unprefixed(f"{component}.", adapter_configs)
        for module, (down, up) in _peft_pairs(_unprefixed(f"{component}.", state), component).items():
            if component == "text_encoder" and not module.startswith("text_model."):
                module = f"text_model.{module}"  # transformers >= 5.6 flattened CLIPTextModel; kohya keeps it
            name = prefix + module.replace(".", "_")
            kohya[f"{name}.lora_down.weight"] = down.contiguous()  # [r, in]
            kohya[f"{name}.lora_up.weight"] = up.contiguous()  # [out, r]
            kohya[f"{name}.alpha"] = torch.tensor(_kohya_alpha(config, down.shape[0]), dtype=torch.float32)
    others = sorted({k.split(".")[0] for k in state} - {"unet", "text_encoder"})
    if others:
        raise NotImplementedError(f"{lora_file}: LoRA parts {others} are not SD 1.x/2.x UNet or text encoder")
    if not kohya:
        raise ValueError(f"{lora_file} holds no LoRA weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, out, metadata=_lora_metadata(kohya, base, out.stem) if base is not None else None)
    return out


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


def _lora_metadata(kohya: dict[str, Tensor], base: StableDiffusionPipeline, title: str) -> dict[str, str]:
    arch = modelspec_architecture(base)
    ranks = Counter(v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(float(v) for k, v in kohya.items() if k.endswith(".alpha"))
    size = base.unet.config.sample_size * base.vae_scale_factor
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}-lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": date.today().isoformat(),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
        "ss_v2": str(arch != "stable-diffusion-v1"),
        "dreambooth.writer": WRITER,
    }
