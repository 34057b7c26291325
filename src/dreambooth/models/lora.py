"""LoRA adapters through peft, saved in the format diffusers' `load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from dreambooth.config import LoraConfig
from dreambooth.models._logs import without_warning
from dreambooth.models.spec import Stage, is_text_encoder

LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file name diffusers' `save_lora_weights` writes and `load_lora_weights` looks for."""


def add_lora(stage: Stage, cfg: LoraConfig, modules: dict[str, nn.Module]) -> None:
    """Attach LoRA adapters to `modules` (component name -> module of `stage`); freeze their base weights.

    Each component gets the stage's `lora_targets` for its name. Adapter A matrices start
    Gaussian and B at zero, so training starts from the base model.
    """
    assert cfg.rank is not None, "add_lora needs lora.rank"
    for name, module in modules.items():
        module.requires_grad_(False)
        module.add_adapter(
            PeftLoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                target_modules=list(stage.lora_targets[name]),
            )
        )


def load_lora_weights(pipeline, path: str | Path, **kwargs) -> None:
    """`pipeline.load_lora_weights(path)`, without diffusers' warning for each text encoder the adapter does
    not touch (it asks the user to open an issue; an adapter of the denoiser alone is the usual case). A file
    with no keys for the denoiser still gets diffusers' warning for that."""
    with without_warning("diffusers.loaders.lora_base", "No LoRA keys associated to"):
        pipeline.load_lora_weights(str(path), **kwargs)


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_modules(stage: Stage) -> dict[str, nn.Module]:
    """The stage's components that carry LoRA adapters, by component name."""
    candidates = {stage.denoiser_name: stage.denoiser, **stage.text_encoders}
    return {name: module for name, module in candidates.items() if has_lora(module)}


def save_lora(stage: Stage, out_dir: Path) -> Path:
    """Write the adapters as `pytorch_lora_weights.safetensors` (diffusers `load_lora_weights` format).

    The pipeline class's own `save_lora_weights` names each component's layers; the adapter
    configs go into the file's metadata, so `load_lora_weights` scales by alpha/rank. Keys are named
    as each component's loader reads them (`_loadable_names`); a transformer's keep peft's names, which
    its loader reads (it would drop `to_q.lora.down`-style keys), as diffusers' SD3/FLUX scripts save them.
    """
    kwargs = {}
    for name, module in lora_modules(stage).items():
        kwargs[f"{name}_lora_layers"] = _loadable_names(name, get_peft_model_state_dict(module))
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(stage.pipeline).save_lora_weights(out_dir, safe_serialization=True, **kwargs)
    return out_dir / LORA_FILE


def _loadable_names(component: str, state: dict) -> dict:
    """peft's adapter keys of `component`, named as diffusers' loader for that component reads them."""
    if component == "transformer":
        return state
    if is_text_encoder(component):  # any encoder's layers (CLIP's q_proj, T5's q), as diffusers names CLIP's
        return {
            k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
            for k, v in state.items()
        }
    renamed = convert_state_dict_to_diffusers(state)
    # The UNet renaming covers attention projections only; where it leaves a peft key (IF's add_k_proj), the
    # loader could not read the mixed file, so the UNet keeps peft's names, which it also reads.
    return state if any(".lora_A." in k for k in renamed) else renamed


def merge_lora(stage: Stage) -> None:
    """Fold the adapters into the base weights and remove them (for a standalone pipeline)."""
    for module in lora_modules(stage).values():
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
        recurse_remove_peft_layers(module)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(module, attr):
                delattr(module, attr)
