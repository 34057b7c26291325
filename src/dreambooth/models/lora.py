"""LoRA adapters through peft, saved in the format diffusers' `load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from dreambooth.config import LoraConfig
from dreambooth.models.spec import Stage


def add_lora(stage: Stage, cfg: LoraConfig, *, text_encoder: bool) -> None:
    """Attach LoRA adapters to the stage's UNet (and text encoder); everything else is frozen.

    Adapter A matrices start Gaussian and B at zero, so training starts from the base model.
    """
    assert cfg.rank is not None, "add_lora needs lora.rank"
    targets = {"unet": stage.lora_targets.unet, "text_encoder": stage.lora_targets.text_encoder}
    modules = {"unet": stage.unet, "text_encoder": stage.text_encoder} if text_encoder else {"unet": stage.unet}
    for name, module in modules.items():
        module.requires_grad_(False)
        module.add_adapter(
            PeftLoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                lora_dropout=cfg.dropout, init_lora_weights="gaussian", target_modules=list(targets[name]),
            )
        )


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def save_lora(stage: Stage, out_dir: Path) -> Path:
    """Write the adapters as `pytorch_lora_weights.safetensors` (diffusers `load_lora_weights` format).

    The adapter configs go into the file's metadata, so `load_lora_weights` scales by alpha/rank.
    """
    kwargs = {}
    for name, module in (("unet", stage.unet), ("text_encoder", stage.text_encoder)):
        if has_lora(module):
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
            kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(stage.pipeline).save_lora_weights(out_dir, safe_serialization=True, **kwargs)
    return out_dir / "pytorch_lora_weights.safetensors"


def merge_lora(stage: Stage) -> None:
    """Fold the adapters into the base weights and remove them (for a standalone pipeline)."""
    for module in (stage.unet, stage.text_encoder):
        if has_lora(module):
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.merge()
            recurse_remove_peft_layers(module)
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if hasattr(module, attr):
                    delattr(module, attr)
