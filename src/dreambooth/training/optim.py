"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from dreambooth.config import OptimConfig


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (fused), bitsandbytes' 8-bit AdamW (a quarter of the optimizer memory), or Adafactor.

    Adafactor (transformers') runs with the configured learning rate (`relative_step=False`),
    no first moment and factored second moments: a few bytes per weight row and column.

    Raises:
        ValueError: if 8-bit Adam is asked for and bitsandbytes is not installed.
    """
    if cfg.use_adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=param_groups[0]["lr"], relative_step=False, scale_parameter=False,
                         warmup_init=False, weight_decay=cfg.weight_decay)
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    if not cfg.use_8bit_adam:
        # One fused kernel for the whole update instead of ~20 passes over the weights, on CPU too.
        return torch.optim.AdamW(param_groups, **kwargs, fused=True)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError(
            "--use-8bit-adam needs bitsandbytes: pip install 'dreambooth[bnb]' (or drop the flag)"
        ) from error
    return bnb.optim.AdamW8bit(param_groups, **kwargs)


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Warm-up then `cfg.lr_scheduler`; stepped once per optimizer step."""
    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=max_steps
    )
