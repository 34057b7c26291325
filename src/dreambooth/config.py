"""The run configuration: one typed dataclass tree shared by the CLI, config files and Python.

Each section checks its own fields in `__post_init__`; `validate` checks the rules that span
sections and reports every problem at once. Field docstrings are the `--help` text. Optional
fields always default to None, so a TOML file (which has no null) round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dreambooth._config_io import raise_problems

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Bump with a `migrate_vN_to_vN1` function in `_config_io` when a field is renamed or removed."""

Precision = Literal["no", "fp16", "bf16"]
Sampler = Literal["dpm++", "ddpm", "ddim", "euler_a"]
"""Sampler names of `dreambooth.generate.SAMPLERS`."""
LrSchedule = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"]

DEFAULT_DINO = "facebook/dino-vits16"
"""DINO ViT-S/16, the paper's DINO and PRES metrics."""
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
"""CLIP ViT-B/32, the paper's CLIP-I and CLIP-T metrics."""


@dataclass(frozen=True)
class ModelConfig:
    source: str = field(default="pocket", metadata={"flag": "model"})
    """Model to personalise: a hub id, a local diffusers folder, a single-file .safetensors checkpoint, a
    cascade folder (stage_1/, stage_2/), or 'pocket' (the built-in model)."""
    sr_source: str | None = field(default=None, metadata={"flag": "sr-model"})
    """Super-resolution stage of a cascade given separately (e.g. DeepFloyd/IF-II-L-v1.0)."""
    upscaler_source: str | None = field(default=None, metadata={"flag": "upscaler-model"})
    """Third stage of a cascade, 256 -> 1024 px (e.g. stabilityai/stable-diffusion-x4-upscaler); needs the SR
    stage."""
    single_file_config: str | None = field(default=None, metadata={"flag": "model-config"})
    """For a single-file checkpoint: a local diffusers folder of the same architecture giving configs and
    tokenizer (needed offline)."""
    allow_pickle: bool = False
    """Allow .ckpt (pickle) checkpoints. Unpickling runs arbitrary code: only for files you trust."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `source`."""
    variant: str | None = None
    """Weights variant to load, e.g. 'fp16'."""
    vae: str | None = None
    """A VAE to use instead of the model's (folder, hub id or single file), e.g. an fp16-safe SDXL VAE; latent
    models only."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={"flag": "weights-dtype"})
    """Dtype the weights load in. auto: bf16 for a LoRA run under --mixed-precision bf16 (the frozen base;
    adapters train in fp32), else fp32 (full fine-tuning keeps fp32 master weights)."""
    quantize: Literal["none", "nf4", "int8", "fp8"] = "none"
    """Quantise the frozen denoiser at load for LoRA training (bitsandbytes nf4/int8, torchao fp8): FLUX/SD3
    on 24 GB."""

    def __post_init__(self) -> None:
        raise_problems([(bool(self.source.strip()), "model.source must not be empty")])


@dataclass(frozen=True)
class SubjectConfig:
    instance_dir: Path | None = None
    """Folder of 3-5 photos of the subject (JPEG/PNG/WebP; optional <name>.txt captions)."""
    class_noun: str | None = None
    """Coarse class of the subject, e.g. 'dog', 'backpack'."""
    instance_prompt: str = "a {identifier} {class_noun}"
    """Prompt of every subject photo without a caption file; {identifier} and {class_noun} are filled in."""
    class_prompt: str = "a {class_noun}"
    """Prompt of the class images for prior preservation."""
    use_captions: bool = True
    """Use <image>.txt caption files next to the photos when present ({identifier}/{class_noun} allowed)."""
    resolution: int | None = None
    """Training and sampling size in pixels (SD, SDXL: a multiple of 8; SD3, FLUX: of 16); None: the model's
    own. Cascades: not settable."""
    random_flip: bool = False
    """Also train on horizontally flipped photos (not for asymmetric subjects: text, logos)."""
    on_bad_file: Literal["skip", "error"] = "skip"
    """What to do with a file in instance_dir that is not a readable image."""

    def __post_init__(self) -> None:
        raise_problems([
            (
                self.resolution is None or self.resolution >= 8,
                f"subject.resolution must be >= 8, got {self.resolution}",
            ),
            (
                self.class_noun is None or bool(self.class_noun.strip()),
                "subject.class_noun must not be empty",
            ),
        ])


@dataclass(frozen=True)
class IdentifierConfig:
    identifier: str | None = None
    """The subject's identifier [V]; None: chosen from the model's own rare tokens, as the paper does."""
    num_tokens: int = field(default=1, metadata={"flag": "identifier-tokens"})
    """How many rare tokens make up an automatic identifier (the paper's k = 1..3)."""
    seed: int = field(default=0, metadata={"flag": "identifier-seed"})
    """Seed of the automatic identifier choice."""

    def __post_init__(self) -> None:
        raise_problems([
            (1 <= self.num_tokens <= 3, f"identifier.num_tokens must be 1..3, got {self.num_tokens}")
        ])


@dataclass(frozen=True)
class PriorConfig:
    enabled: bool = field(default=True, metadata={"flag": "prior-preservation"})
    """Class-specific prior-preservation loss (Eq. 2 of Ruiz et al. 2023)."""
    num_class_images: int = 200
    """Class images the frozen model generates before training (reused across runs)."""
    class_dir: Path | None = None
    """Where class images live; None: <run_dir>/class_images."""
    loss_weight: float = field(default=1.0, metadata={"flag": "prior-loss-weight"})
    """Weight lambda of the prior term; the paper uses 1."""
    sampler: Sampler = field(default="dpm++", metadata={"flag": "class-sampler"})
    """Solver for class images: 'ddpm' is the paper's ancestral sampler; 'dpm++' is as good in 4x fewer
    steps."""
    steps: int = field(default=25, metadata={"flag": "class-steps"})
    """Denoising steps per class image."""
    guidance_scale: float | None = field(default=None, metadata={"flag": "class-guidance"})
    """Classifier-free guidance for class images; None: the model family's default."""
    batch_size: int = field(default=8, metadata={"flag": "class-batch-size"})
    """Class images generated per forward pass."""
    seed: int = field(default=0, metadata={"flag": "class-seed"})
    """Base seed; image i uses seed + i, so any subset can be regenerated exactly."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.num_class_images >= 1, f"prior.num_class_images must be >= 1, got {self.num_class_images}"),
            (self.loss_weight >= 0, f"prior.loss_weight must be >= 0, got {self.loss_weight}"),
            (self.steps >= 1 and self.batch_size >= 1, "prior.steps and prior.batch_size must be >= 1"),
        ])


@dataclass(frozen=True)
class LoraConfig:
    rank: int | None = field(default=None, metadata={"flag": "lora-rank"})
    """LoRA rank; None: full fine-tuning (the paper's choice). 4-32 is enough for one subject."""
    alpha: float | None = field(default=None, metadata={"flag": "lora-alpha"})
    """LoRA scale numerator; None: alpha = rank."""
    dropout: float = field(default=0.0, metadata={"flag": "lora-dropout"})
    """Dropout on the LoRA branch."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.rank is None or self.rank > 0, f"lora.rank must be > 0, got {self.rank}"),
            (0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}"),
        ])


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float | None = None
    """Peak learning rate; None: 5e-6 for full fine-tuning, 1e-4 for LoRA."""
    text_encoder_learning_rate: float | None = None
    """Learning rate of the text encoder(s) when they train; None: same as learning_rate."""
    text_encoder_2_learning_rate: float | None = None
    """Learning rate of SDXL's second text encoder (OpenCLIP bigG) when it trains; None:
    text_encoder_learning_rate."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    use_8bit_adam: bool = False
    """8-bit AdamW from bitsandbytes: 1/4 of the optimizer memory."""
    use_adafactor: bool = False
    """Adafactor (factored second moments, no first moment): the least optimizer memory, for full
    fine-tuning."""
    lr_scheduler: LrSchedule = "constant"
    """Learning-rate schedule after warm-up."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        rates = ("learning_rate", "text_encoder_learning_rate", "text_encoder_2_learning_rate")
        raise_problems([
            *(
                (
                    getattr(self, name) is None or getattr(self, name) > 0,
                    f"optim.{name} must be > 0, got {getattr(self, name)}",
                )
                for name in rates
            ),
            (self.lr_warmup_steps >= 0, f"optim.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}"),
            (self.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (
                not (self.use_8bit_adam and self.use_adafactor),
                "optim.use_8bit_adam and optim.use_adafactor contradict each other: pick one",
            ),
        ])


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 400
    """Optimizer steps per stage (the community uses 400-1200 for Stable Diffusion)."""
    batch_size: int = 1
    """Subject images per device per step; prior preservation adds as many class images."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: Precision = "no"
    """Autocast precision; frozen parts are stored in it too. fp16 needs a GPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% slower."""
    compile: bool = False
    """torch.compile the denoiser's repeated blocks (regional compilation): faster steps on a GPU after
    a first step that compiles (cached by torch for later runs); needs a C++ compiler on CPU."""
    train_text_encoder: bool = False
    """Fine-tune the text encoder(s) too (the paper fine-tunes all layers)."""
    text_encoders: tuple[str, ...] | None = None
    """Which text encoders --train-text-encoder trains, by component name; None: all the family's (SDXL:
    text_encoder text_encoder_2)."""
    cache_latents: bool = True
    """Encode the prompts once, before training, when the text encoders are frozen (so they leave the GPU
    while training); off: encode them every step. Only the prompts: the photos (and class images) are
    always encoded once, whatever this says."""
    caption_dropout: float = 0.0
    """Probability of training on the empty prompt (for classifier-free guidance when pretraining)."""
    ema_decay: float | None = None
    """Exponential moving average of the trained weights with this decay; exports use the average."""
    seed: int = 0
    """Seed of data order, noise and timesteps: a run is reproducible from it."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}"),
            (self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
            (
                0 <= self.caption_dropout < 1,
                f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}",
            ),
            (
                self.ema_decay is None or 0 < self.ema_decay < 1,
                f"train.ema_decay must be in (0, 1), got {self.ema_decay}",
            ),
        ])


CASCADE_STAGES = ("base", "sr", "upscaler")
"""A cascade's stages in order: text-to-image, super-resolution, and the optional x4 upscaler."""

SR_NOISE_LEVELS: tuple[int, int] = (0, 250)
"""Default augmentation levels of the low-res input while fine-tuning a super-resolution stage: low,
so the stage learns the subject's fine detail from inputs close to the photo (measured in docs/pocket.md)."""


@dataclass(frozen=True)
class CascadeConfig:
    stages: tuple[str, ...] = ("base", "sr")
    """Stages of a cascade to fine-tune (ignored for single-stage models): base, sr, upscaler (the third
    stage, when the model has one). Personalised SR is the paper's finding; the upscaler helps subjects with
    very fine texture."""
    sr_max_steps: int | None = None
    """Optimizer steps of each super-resolution stage (sr, upscaler); None: train.max_steps."""
    sr_learning_rate: float | None = None
    """Learning rate of each super-resolution stage (sr, upscaler); None: the base stage's."""
    noise_level_range: tuple[int, int] = SR_NOISE_LEVELS
    """Augmentation levels of the low-res input drawn while fine-tuning SR; sampling conditions on one
    level (250 in IF)."""

    def __post_init__(self) -> None:
        low, high = self.noise_level_range
        raise_problems([
            (
                len(self.stages) >= 1 and set(self.stages) <= set(CASCADE_STAGES),
                f"cascade.stages must be a subset of {', '.join(CASCADE_STAGES)}; got {self.stages}",
            ),
            (
                0 <= low < high,
                f"cascade.noise_level_range must be 0 <= low < high, got {self.noise_level_range}",
            ),
        ])


@dataclass(frozen=True)
class FlowConfig:
    """Rectified-flow training of flow-matching transformers (SD3, FLUX); DDPM families ignore it."""

    density: Literal["logit_normal", "uniform", "mode"] = field(
        default="logit_normal", metadata={"flag": "flow-density"}
    )
    """How noise levels sigma are drawn (before the model's shift); logit-normal(0, 1) is SD3's (Esser et al.
    2024)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal density."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal density."""
    mode_scale: float = 1.29
    """Scale of the 'mode' density."""
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = field(
        default="none", metadata={"flag": "flow-weighting"}
    )
    """Per-sample loss weighting."""
    guidance: float = field(default=1.0, metadata={"flag": "train-guidance"})
    """Guidance value fed to a guidance-distilled model's guidance embedding while training (FLUX.1-dev)."""

    def __post_init__(self) -> None:
        raise_problems([(self.logit_std > 0, f"flow.logit_std must be > 0, got {self.logit_std}")])


@dataclass(frozen=True)
class ValidationConfig:
    validation_prompts: tuple[str, ...] = (
        "a {identifier} {class_noun} on the beach",
        "a {identifier} {class_noun} in the snow",
        "a {class_noun}",
    )
    """Prompts sampled while training; the last shows whether the class prior survives."""
    every_n_steps: int = field(default=100, metadata={"flag": "validation-every"})
    """Sample validation images every N steps (and at the end); 0: only at the end."""
    num_images: int = field(default=4, metadata={"flag": "validation-images"})
    """Images per validation prompt; 0: no validation samples at all (not even at the end)."""
    steps: int = field(default=25, metadata={"flag": "validation-steps"})
    """Denoising steps of validation samples."""
    guidance_scale: float | None = field(default=None, metadata={"flag": "validation-guidance"})
    """Classifier-free guidance of validation samples; None: the family's default."""
    seed: int = field(default=0, metadata={"flag": "validation-seed"})
    """Seed of validation samples: the same noise at every step, so grids are comparable."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.every_n_steps >= 0, "validation.every_n_steps must be >= 0"),
            (
                self.num_images >= 0 and self.steps >= 1,
                "validation.num_images must be >= 0 and validation.steps >= 1",
            ),
        ])


@dataclass(frozen=True)
class EvalConfig:
    eval_every: int = 0
    """Score samples with the paper's metrics every N steps (and at the end) and export the best checkpoint;
    0: off."""
    eval_prompts: tuple[str, ...] = (
        "a {identifier} {class_noun} in the snow",
        "a {identifier} {class_noun} on the beach",
        "a {identifier} {class_noun} with a city in the background",
        "a red {identifier} {class_noun}",
    )
    """Prompts scored during training (DreamBench's first prompts); "a {class_noun}" is always added for
    PRES."""
    num_images: int = field(default=4, metadata={"flag": "eval-images"})
    """Images per prompt at each evaluation."""
    best_metric: Literal["dino", "clip_i", "clip_t"] = "dino"
    """Metric that picks the best checkpoint (higher is better)."""
    max_pres_increase: float = 0.1
    """Prior-collapse guard: a checkpoint whose PRES exceeds the pretrained model's by more is never the
    best."""
    embedders: Literal["auto", "paper"] = field(default="auto", metadata={"flag": "eval-embedders"})
    """'paper': DINO, CLIP and LPIPS; 'auto': the model's own scorers where it ships them (the pocket model),
    else the paper's."""
    dino: str = field(default=DEFAULT_DINO, metadata={"flag": "eval-dino"})
    """DINO ViT-S/16 hub id or local folder (the DINO and PRES metrics)."""
    clip: str = field(default=DEFAULT_CLIP, metadata={"flag": "eval-clip"})
    """CLIP hub id or local folder (CLIP-I and CLIP-T)."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.eval_every >= 0, f"eval.eval_every must be >= 0, got {self.eval_every}"),
            (self.num_images >= 1, f"eval.num_images must be >= 1, got {self.num_images}"),
        ])


@dataclass(frozen=True)
class CheckpointConfig:
    every_n_steps: int = field(default=100, metadata={"flag": "checkpoint-every"})
    """Write a resumable checkpoint every N steps (and at the end); 0: only at the end."""
    keep_last: int = field(default=2, metadata={"flag": "keep-checkpoints"})
    """How many checkpoints to keep per stage (older ones are deleted)."""

    def __post_init__(self) -> None:
        raise_problems([
            (self.every_n_steps >= 0, "checkpoint.every_n_steps must be >= 0"),
            (self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}"),
        ])


@dataclass(frozen=True)
class OutputConfig:
    run_dir: Path | None = None
    """Run folder; None: runs/<instance_dir name>."""
    overwrite: bool = False
    """Delete an existing run folder and start again."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint."""
    save_pipeline: bool = True
    """Write the full fine-tuned pipeline (LoRA merged in for LoRA runs) to <run_dir>/pipeline."""
    save_single_file: bool = False
    """Also write <run_dir>/model.safetensors in the original SD/SDXL layout (fp16) for A1111/ComfyUI
    (`dreambooth export` does the same later)."""
    logger: Literal["auto", "tensorboard", "none"] = "auto"
    """Metrics logger; auto: TensorBoard when installed."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one `dreambooth train` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    subject: SubjectConfig = field(default_factory=SubjectConfig)
    identifier: IdentifierConfig = field(default_factory=IdentifierConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    schema_version: int = SCHEMA_VERSION
    """Version of this schema; older files are migrated on load."""

    @property
    def learning_rate(self) -> float:
        """The learning rate in effect: the configured one, else the default for the method."""
        if self.optim.learning_rate is not None:
            return self.optim.learning_rate
        return 1e-4 if self.lora.rank is not None else 5e-6

    @property
    def weights_dtype(self) -> str:
        """The dtype weights load in ('fp32', 'bf16', 'fp16'): `model.dtype`, resolved when 'auto'."""
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bf16" if self.lora.rank is not None and self.train.mixed_precision == "bf16" else "fp32"

    @property
    def run_dir(self) -> Path:
        if self.output.run_dir is not None:
            return self.output.run_dir
        name = self.subject.instance_dir.name if self.subject.instance_dir else "dreambooth"
        return Path("runs") / name


def validate(cfg: RunConfig, *, has_gpu: bool | None = None) -> None:
    """Check the rules that span sections, and what the machine must offer; raise one ValueError listing every
    problem.

    Harmless leftovers (a setting that has no effect) only warn.

    Args:
        cfg: The run configuration.
        has_gpu: Whether a CUDA device is available; None: ask torch.

    Raises:
        ValueError: if any rule is broken.
    """
    problems: list[str] = []
    if cfg.train.mixed_precision != "no" and has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not has_gpu:
        problems.append("train.mixed_precision 'fp16' needs a GPU; on CPU use 'no' (fp32)")
    if cfg.train.compile and not (shutil.which("g++") or shutil.which("c++") or os.environ.get("CXX")):
        problems.append("--compile needs a C++ compiler (torch.compile builds kernels): install g++")
    if cfg.output.logger == "tensorboard" and not importlib.util.find_spec("tensorboard"):
        problems.append("--logger tensorboard needs TensorBoard: pip install 'dreambooth[tensorboard]'")
    if cfg.subject.instance_dir is None:
        problems.append("subject.instance_dir is required (--instance-dir DIR: a folder of 3-5 photos)")
    if cfg.subject.class_noun is None:
        problems.append("subject.class_noun is required (--class-noun NOUN, e.g. 'dog')")
    for flag, folder in (
        ("--class-dir", cfg.prior.class_dir if cfg.prior.enabled else None),
        ("--run-dir", cfg.output.run_dir),
    ):
        if folder is not None and folder.exists() and not folder.is_dir():
            problems.append(
                f"{flag} {str(folder)!r} is a file, not a folder: name a folder (it is created if missing)"
            )
    if cfg.output.resume and cfg.output.overwrite:
        problems.append("output.resume and output.overwrite contradict each other: pick one")
    for template in (cfg.subject.instance_prompt, *cfg.validation.validation_prompts, *cfg.eval.eval_prompts):
        problems += _template_problems(template)
    if "{identifier}" not in cfg.subject.instance_prompt:
        problems.append(
            f"subject.instance_prompt {cfg.subject.instance_prompt!r} lacks {{identifier}}: the subject "
            "would have no key"
        )
    problems += _template_problems(cfg.subject.class_prompt)
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))

    if cfg.train.mixed_precision == "bf16" and not has_gpu:
        logger.warning(
            "train.mixed_precision 'bf16' without a GPU: a CPU without bf16 matrix units runs it slower than "
            "fp32 (--mixed-precision no)"
        )
    if not cfg.prior.enabled and cfg.prior.class_dir is not None:
        logger.warning("prior.class_dir is set but prior preservation is off: it is ignored")
    for name in ("text_encoder_learning_rate", "text_encoder_2_learning_rate"):
        if not cfg.train.train_text_encoder and getattr(cfg.optim, name) is not None:
            logger.warning("optim.%s is set but train.train_text_encoder is off: it is ignored", name)
    if not cfg.train.train_text_encoder and cfg.train.text_encoders is not None:
        logger.warning("train.text_encoders is set but train.train_text_encoder is off: it is ignored")
    if cfg.lora.rank is None and cfg.lora.alpha is not None:
        logger.warning("lora.alpha is set but lora.rank is not (full fine-tuning): it is ignored")


def resolve(cfg: RunConfig, identifier: str | None = None) -> RunConfig:
    """`cfg` with every value left to a default that depends on other settings filled in, as the run uses it.

    The learning rate (the method's default), the text encoders' rates when they train, the run
    folder, and the identifier once it is chosen. Loading the result gives the same run.
    """
    rate = cfg.learning_rate
    optim = dataclasses.replace(cfg.optim, learning_rate=rate)
    if cfg.train.train_text_encoder:
        text_rate = cfg.optim.text_encoder_learning_rate or rate
        optim = dataclasses.replace(
            optim, text_encoder_learning_rate=text_rate,
            text_encoder_2_learning_rate=cfg.optim.text_encoder_2_learning_rate or text_rate,
        )
    chosen = (
        dataclasses.replace(cfg.identifier, identifier=identifier) if identifier is not None
        else cfg.identifier
    )
    output = dataclasses.replace(cfg.output, run_dir=cfg.run_dir)
    return dataclasses.replace(cfg, optim=optim, identifier=chosen, output=output)


def _template_problems(template: str) -> list[str]:
    # Placeholders are replaced literally (a caption may hold any other braces); a misspelt one is an error.
    unknown = sorted(set(re.findall(r"\{(\w*)\}", template)) - {"identifier", "class_noun"})
    if unknown:
        return [
            f"prompt template {template!r}: unknown placeholder(s) "
            f"{', '.join('{' + u + '}' for u in unknown)}; "
            "only {identifier} and {class_noun} are filled in"
        ]
    return []


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Build a RunConfig from defaults, then a TOML/YAML file, then overrides (e.g. CLI flags).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: naming a key that is unknown or has a wrong type.
    """
    from dreambooth._config_io import from_dict, load_file, merge, migrate

    data = migrate(load_file(Path(path)), SCHEMA_VERSION) if path is not None else {}
    return from_dict(RunConfig, merge(data, overrides or {}))
