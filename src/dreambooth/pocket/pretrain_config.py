"""Settings of `dreambooth pocket pretrain` (a light module: the CLI builds flags from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class PretrainConfig:
    run_dir: Path = Path("runs/pocket-pretrain")
    """Where checkpoints, logs and previews go (rerun the command to resume)."""
    num_images: int = 40000
    """Rendered training scenes (each with one caption, attributes dropped at random)."""
    base_steps: int = 6000
    """Optimizer steps of the 32x32 base stage (and its text encoder)."""
    sr_steps: int = 2000
    """Optimizer steps of the 32->64 super-resolution stage."""
    batch_size: int = 32
    """Scenes per step."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate (cosine decay after warm-up)."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    caption_dropout: float = 0.1
    """Share of empty captions, for classifier-free guidance."""
    ema_decay: float = 0.998
    """EMA of the weights; the saved cascade uses the average."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """fp32 is faster than bf16 autocast for UNets this small on CPU (FIELD-NOTES)."""
    seed: int = 0
    """Seed of the world's scenes, initialisation, noise and data order."""


@dataclass(frozen=True)
class PretrainFlags:
    """The config tree of the pretraining command: one section."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
