"""Settings of the pocket commands: `dreambooth demo`, `dreambooth pocket
pretrain|ablation|quality|train-scorer`.

A light module: the CLI builds its flags from these dataclasses without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dreambooth._config_io import raise_problems
from dreambooth.config import LrSchedule


@dataclass(frozen=True)
class PretrainConfig:
    run_dir: Path = Path("runs/pocket-pretrain")
    """Where checkpoints, logs and previews go (rerun the command to resume)."""
    num_images: int = 40000
    """Rendered training scenes (each with one caption, attributes dropped at random)."""
    base_steps: int = 4500
    """Optimizer steps of the 32x32 base stage (and its text encoder)."""
    sr_steps: int = 2800
    """Optimizer steps of the 32->64 super-resolution stage."""
    sr_noise_levels: tuple[int, int] = (0, 500)
    """Augmentation levels of the SR stage's low-res input in training (sampling uses 250): levels near
    1000 leave almost nothing of the input, and a stage this small must first learn to use it."""
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
    """fp32 by default: on CPU, bf16 autocast is slower than fp32 for UNets this small."""
    seed: int = 0
    """Seed of the world's scenes, initialisation, noise and data order."""
    lr_scheduler: LrSchedule = "cosine"
    """Learning-rate schedule after warm-up."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    checkpoint_every: int = 250
    """Write a resumable checkpoint every N steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep per stage (older ones are deleted)."""
    preview_every: int = 1000
    """Save a grid of the preview prompts every N steps (and at the end); 0: only at the end."""
    preview_steps: int = 25
    """Denoising steps of the previews."""
    preview_guidance: float = 4.0
    """Classifier-free guidance of the previews (every stage)."""
    export_to: Path | None = None
    """Also copy the pretrained cascade here (e.g. src/dreambooth/pocket/weights/cascade)."""

    def __post_init__(self) -> None:
        low, high = self.sr_noise_levels
        raise_problems([
            *((value >= 1, f"pretrain.{name} must be >= 1, got {value}") for name, value in [
                ("num_images", self.num_images), ("base_steps", self.base_steps), ("sr_steps", self.sr_steps),
                ("batch_size", self.batch_size), ("keep_checkpoints", self.keep_checkpoints),
                ("preview_steps", self.preview_steps),
            ]),
            *((value >= 0, f"pretrain.{name} must be >= 0, got {value}") for name, value in [
                ("warmup_steps", self.warmup_steps), ("weight_decay", self.weight_decay),
                ("checkpoint_every", self.checkpoint_every),
                ("preview_every", self.preview_every), ("preview_guidance", self.preview_guidance),
            ]),
            (self.learning_rate > 0, f"pretrain.learning_rate must be > 0, got {self.learning_rate}"),
            (0 <= self.caption_dropout < 1,
             f"pretrain.caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (0 < self.ema_decay < 1, f"pretrain.ema_decay must be in (0, 1), got {self.ema_decay}"),
            (0 <= low < high,
             f"pretrain.sr_noise_levels must be 0 <= low < high, got {self.sr_noise_levels}"),
        ])  # fmt: skip


@dataclass(frozen=True)
class PretrainFlags:
    """The config tree of the pretraining command: one section."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass(frozen=True)
class DemoConfig:
    run_dir: Path = Path("runs/demo")
    """Where the photos, the fine-tuned run, the contact sheet and metrics.json go."""
    subject: str = "checker_cube"
    """A ready pocket subject: checker_cube, twotone_ball or scarf_teddy."""
    subject_seed: int | None = None
    """Make a new random subject from this seed instead (e.g. 7)."""
    num_photos: int = 4
    """Photos of the subject, each in a different context."""
    prior_preservation: bool = True
    """Train with the class-specific prior-preservation loss (turn off to see language drift)."""
    base_steps: int = 150
    """Fine-tuning steps of the 32x32 base stage."""
    sr_steps: int = 80
    """Fine-tuning steps of the 32->64 super-resolution stage (0: keep the pretrained SR)."""
    sr_learning_rate: float = 2e-4
    """Learning rate of the super-resolution stage (the base stage uses 2e-4)."""
    num_class_images: int = 32
    """Class images the pretrained model generates for prior preservation."""
    images_per_prompt: int = 3
    """Samples per prompt, before and after."""
    sampling_steps: int = 12
    """Denoising steps of every sample."""
    model: str = "pocket"
    """The model to personalise (the built-in pocket cascade)."""
    seed: int = 0
    """Seed of photos, training and samples."""

    def __post_init__(self) -> None:
        for flag, value, low in [
            ("--base-steps", self.base_steps, 1), ("--sr-steps", self.sr_steps, 0),
            ("--num-class-images", self.num_class_images, 1),
            ("--images-per-prompt", self.images_per_prompt, 1), ("--sampling-steps", self.sampling_steps, 1),
        ]:
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if not 1 <= self.num_photos <= 8:
            raise ValueError(
                "--num-photos must be 1-8 (each photo takes one of the 10 contexts; the rest are the new "
                f"ones), got {self.num_photos}"
            )


@dataclass(frozen=True)
class AblationConfig(DemoConfig):
    """The demo protocol, with the longer super-resolution fine-tuning the SR finding needs (docs/pocket.md):
    80 steps, the demo's budget, do not move the subject's fine detail measurably; 400 steps at 1e-3 do."""

    run_dir: Path = Path("runs/ablation")
    """Where each subject/setting's run goes (<run_dir>/<subject>/<setting>) and ablation.json."""
    sr_steps: int = 400
    """Fine-tuning steps of the 32->64 super-resolution stage."""
    sr_learning_rate: float = 1e-3
    """Learning rate of the super-resolution stage."""
    new_subject_seeds: tuple[int, ...] = (101, 202)
    """Seeds of new random subjects, personalised beside the ready ones."""


@dataclass(frozen=True)
class AblationFlags:
    """The config tree of `dreambooth pocket ablation`: one section."""

    demo: AblationConfig = field(default_factory=AblationConfig)


@dataclass(frozen=True)
class DemoFlags:
    """The config tree of `dreambooth demo`: one section."""

    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass(frozen=True)
class QualityConfig:
    model: str = "pocket"
    """A pocket cascade (folder); 'pocket': the built-in one."""
    out: Path | None = None
    """Also write the figures to this JSON file."""


@dataclass(frozen=True)
class QualityFlags:
    """The config tree of `dreambooth pocket quality`: one section."""

    quality: QualityConfig = field(default_factory=QualityConfig)


@dataclass(frozen=True)
class ScorerTrainingConfig:
    out: Path = Path("pocket_scorer.safetensors")
    """Where the weights go. The scorer the package ships is only replaced when named here explicitly."""
    seed: int = 0
    """Seed of the training scenes, initialisation and data order."""
    steps: int = 1500
    """Optimizer steps."""
    threads: int = 1
    """torch CPU threads; bitwise reproducible for a given count and CPU."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.steps >= 1, f"scorer.steps must be >= 1, got {self.steps}"),
            (self.threads >= 1, f"scorer.threads must be >= 1, got {self.threads}"),
        ])


@dataclass(frozen=True)
class ScorerTrainingFlags:
    """The config tree of `dreambooth pocket train-scorer`: one section."""

    scorer: ScorerTrainingConfig = field(default_factory=ScorerTrainingConfig)
