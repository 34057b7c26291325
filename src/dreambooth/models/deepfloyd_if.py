"""Imagen-like pixel cascades in DeepFloyd IF format (real IF, and the built-in pocket model).

The base stage denoises pixels at 64x64 (IF) or 32x32 (pocket). The super-resolution stage
trains exactly as `IFSuperResolutionPipeline` samples: its input is the noisy high-res image
concatenated with the *real low-res image*, bilinearly upscaled and noise-augmented by the
pipeline's `image_noising_scheduler`, and the augmentation level is passed as `class_labels`.
(Two popular trainers feed the noisy target concatenated with itself and pass the timestep
instead, so their model meets different inputs at sampling time.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import IFPipeline, IFSuperResolutionPipeline
from torch import Tensor, nn

from dreambooth.config import SR_NOISE_LEVELS, RunConfig
from dreambooth.models._folders import folder_variant
from dreambooth.models._lowres import augment, downsample
from dreambooth.models.ddpm import DDPMObjective
from dreambooth.models.sd_upscaler import load_upscaler
from dreambooth.models.spec import (
    DTYPES,
    Encoded,
    Family,
    Framing,
    ModelSource,
    TextConditioning,
    Tokens,
    tokenize,
)
from dreambooth.seeding import RowRandom

LORA_TARGETS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),
    "text_encoder": ("q", "k", "v", "o"),
}
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
"""IF pipeline components the tool neither trains nor needs (the safety checker and its feature extractor, the
watermarker)."""


def upscale(lowres: Tensor, size: int) -> Tensor:
    """Upscale as IFSuperResolutionPipeline does (bilinear, align_corners=True)."""
    return F.interpolate(lowres, (size, size), mode="bilinear", align_corners=True)


def preprocess_prompt(prompt: str) -> str:
    """The text IF's pipelines tokenize (`_text_preprocessing` without caption cleaning): lower-cased,
    stripped.

    T5 is case-sensitive, so training must see the same text or 'OHWX' trains other tokens than sampling uses.
    """
    return prompt.lower().strip()


def _encode_t5(text_encoder: nn.Module, tokens: Tokens) -> TextConditioning:
    # IFPipeline.encode_prompt passes the attention mask and takes the last hidden state.
    device = next(text_encoder.parameters()).device
    return TextConditioning(
        text_encoder(tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))[0]
    )


def _epsilon(output: Tensor, channels: int) -> Tensor:
    # IF UNets output [prediction (epsilon, or v for the pocket model), variance] along channels;
    # the denoising loss is on the prediction.
    return output[:, :channels]


@dataclass(kw_only=True)
class _IFStage:
    """What both stages of a cascade share: a pipeline, its T5 text encoder, pixels as x0."""

    pipeline: IFPipeline | IFSuperResolutionPipeline
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    objective: DDPMObjective
    name: str
    default_guidance: float
    denoiser_name: str = "unet"
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_TARGETS))

    @property
    def tokenizers(self) -> tuple:
        return (self.pipeline.tokenizer,)

    @property
    def resolution(self) -> int:
        return self.pipeline.unet.config.sample_size

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {}

    def tokenize(self, prompts: list[str]) -> Tokens:
        return tokenize(self.pipeline.tokenizer, [preprocess_prompt(p) for p in prompts])

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        return encoded["pixels"]

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        return _encode_t5(self.text_encoders["text_encoder"], tokens)


@dataclass(kw_only=True)
class IFBaseStage(_IFStage):
    """The text-to-image base stage of a pixel cascade."""

    pipeline: IFPipeline
    name: str = "base"
    default_guidance: float = 7.0

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        return {"pixels": pixels.float()}

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        return _epsilon(
            self.denoiser(noisy, level, encoder_hidden_states=text.sequence).sample, noisy.shape[1]
        )


@dataclass(kw_only=True)
class IFSuperResStage(_IFStage):
    """The super-resolution stage, conditioned on the noise-augmented low-res image and its level."""

    pipeline: IFSuperResolutionPipeline
    low_resolution: int
    noise_level_range: tuple[int, int] = SR_NOISE_LEVELS
    name: str = "sr"
    default_guidance: float = 4.0

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        # The low-res input is the real photo seen at the base stage's resolution.
        return {"pixels": pixels.float(), "lowres": downsample(pixels.float(), self.low_resolution)}

    def condition(self, lowres: Tensor, rng: RowRandom) -> tuple[Tensor, Tensor]:
        """Upscaled, noise-augmented low-res input [b, 3, H, W] and its augmentation level [b]."""
        return augment(
            upscale(lowres, self.resolution), self.pipeline.image_noising_scheduler, self.noise_level_range,
            rng,
        )

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        augmented, augmentation = self.condition(encoded["lowres"], rng)
        return self.denoise(noisy, level, text.sequence, augmented, augmentation)

    def denoise(
        self, noisy: Tensor, level: Tensor, text: Tensor, augmented: Tensor, augmentation: Tensor
    ) -> Tensor:
        """The prediction for `noisy` given the upscaled, already noise-augmented low-res input."""
        model_input = torch.cat([noisy, augmented.to(noisy)], dim=1)  # [b, 6, H, W], as the pipeline does
        output = self.denoiser(model_input, level, encoder_hidden_states=text, class_labels=augmentation)
        return _epsilon(output.sample, noisy.shape[1])

    @classmethod
    def from_pipeline(
        cls, pipeline: IFSuperResolutionPipeline, low_resolution: int, *,
        noise_level_range: tuple[int, int] = SR_NOISE_LEVELS,
    ) -> IFSuperResStage:
        """The stage of a loaded SR pipeline whose base stage samples at `low_resolution`."""
        components = _components(pipeline)
        return cls(**components, low_resolution=low_resolution, noise_level_range=noise_level_range)


def load_if(
    source: str, sr_source: str | None = None, *, noise_level_range: tuple[int, int] = SR_NOISE_LEVELS,
    revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32,
    share_text_encoder: bool = True, upscaler_source: str | None = None,
) -> list:
    """Load the stages of an IF cascade on CPU in `dtype`: the base from `source`, SR from `sr_source` if
    given, and the x4 upscaler (`models.sd_upscaler`) from `upscaler_source` if given.

    Without a `variant`, fp16/bf16 weights are read from a repo's fp16 files when it ships them (IF's
    do: half the bytes of its fp32 files), else from its default files. IF-II ships its own copy of
    IF-I's T5-XXL: when stage II's text encoder files are the same as stage I's, stage II gets stage
    I's module, so one T5 is in memory. `share_text_encoder=False` loads each stage's own, as a run
    that trains text encoders needs (one stage's training would otherwise change the other's encoder).
    """
    base_variant = _variant(source, revision, variant, dtype)
    base_dir = _pipeline_folder(IFPipeline, source, revision, base_variant)
    base_pipe = IFPipeline.from_pretrained(base_dir, variant=base_variant, dtype=dtype, **NO_SAFETY)
    stages: list = [IFBaseStage(**_components(base_pipe))]
    if sr_source is not None:
        sr_variant = _variant(sr_source, None, variant, dtype)
        sr_dir = _pipeline_folder(IFSuperResolutionPipeline, sr_source, None, sr_variant)
        shared = share_text_encoder and _same_text_encoder(base_dir, base_variant, sr_dir, sr_variant)
        own = {"text_encoder": base_pipe.text_encoder} if shared else {}
        sr_pipe = IFSuperResolutionPipeline.from_pretrained(
            sr_dir, variant=sr_variant, dtype=dtype, **own, **NO_SAFETY
        )
        stages.append(
            IFSuperResStage.from_pipeline(sr_pipe, stages[0].resolution, noise_level_range=noise_level_range)
        )
    if upscaler_source is not None:
        stages.append(
            load_upscaler(
                upscaler_source, stages[-1].resolution,
                variant=_variant(upscaler_source, None, variant, dtype), dtype=dtype,
            )
        )
    return stages


def _variant(source: str, revision: str | None, variant: str | None, dtype: torch.dtype) -> str | None:
    """The weight files to read: `variant` if given; the only ones a local folder's components have
    (`folder_variant`); for fp16/bf16 weights the fp16 files if the repo has them; else the default files."""
    if variant is not None:
        return variant
    if Path(source).is_dir() and (only := folder_variant(Path(source))) is not None:
        return only
    if dtype == torch.float32:
        return None
    # model.fp16-00001-of-00002.safetensors
    fp16 = [name for name in _file_names(source, revision) if ".fp16." in name or ".fp16-" in name]
    return "fp16" if fp16 else None


def _file_names(source: str, revision: str | None) -> list[str]:
    """The files of a pipeline folder, or of a hub repo (its listing; offline, what the hub cache holds)."""
    folder = Path(source)
    if not folder.is_dir():
        import huggingface_hub

        if not huggingface_hub.constants.is_offline_mode():
            return huggingface_hub.list_repo_files(source, revision=revision)
        folder = Path(huggingface_hub.snapshot_download(source, revision=revision, local_files_only=True))
    return [path.relative_to(folder).as_posix() for path in folder.glob("*/*")]


def _pipeline_folder(cls, source: str, revision: str | None, variant: str | None) -> Path:
    """The local folder of a pipeline: `source` itself, or a hub repo's snapshot in the hub cache (downloaded
    if needed)."""
    if Path(source).is_dir():
        return Path(source)
    # NO_SAFETY's parts are not downloaded
    return Path(cls.download(source, revision=revision, variant=variant, **NO_SAFETY))


def _same_text_encoder(
    base_dir: Path, base_variant: str | None, sr_dir: Path, sr_variant: str | None
) -> bool:
    """Whether two IF pipeline folders hold the same text encoder: the same config and the same weight
    files."""
    base, sr = base_dir / "text_encoder", sr_dir / "text_encoder"
    if not ((base / "config.json").is_file() and (sr / "config.json").is_file()) or _config(base) != _config(
        sr
    ):
        return False
    base_files, sr_files = _weight_files(base, base_variant), _weight_files(sr, sr_variant)
    return ([f.name for f in base_files] == [f.name for f in sr_files]) and all(
        map(_same_file, base_files, sr_files)
    )


def _config(folder: Path) -> dict:
    # Where it was saved from and by which version do not change the model.
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The weight files `from_pretrained` reads from a component folder: the variant's if it has them, else
    the default ones."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    chosen = [
        p for p in weights if variant is not None and (f".{variant}." in p.name or f".{variant}-" in p.name)
    ]
    # model.safetensors, model-00001-of-00002.safetensors
    return chosen or [p for p in weights if p.name.count(".") == 1]


def _same_file(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes. The hub cache names each blob by its content hash (sha256 for
    LFS files), so two snapshot files are the same when their symlinks resolve to blobs of one name."""
    a, b = a.resolve(), b.resolve()
    if a == b:
        return True
    if a.parent.name == b.parent.name == "blobs":
        return a.name == b.name
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while chunk := fa.read(1 << 24):
            if chunk != fb.read(len(chunk)):
                return False
    return True


def _components(pipeline: IFPipeline | IFSuperResolutionPipeline) -> dict:
    # Training noises with DDPM from the pipeline's config, whatever scheduler sampling is given.
    return dict(
        pipeline=pipeline, denoiser=pipeline.unet, text_encoders={"text_encoder": pipeline.text_encoder},
        objective=DDPMObjective.from_config(pipeline.scheduler.config),
    )


def _load(source: ModelSource, cfg: RunConfig) -> list:
    levels = cfg.cascade.noise_level_range
    return load_if(
        source.base, source.sr, noise_level_range=levels, revision=cfg.model.revision,
        variant=cfg.model.variant, dtype=DTYPES[cfg.weights_dtype],
        share_text_encoder=not cfg.train.train_text_encoder, upscaler_source=source.upscaler,
    )


FAMILY = Family(
    name="if", pipeline_classes=("IFPipeline",), load=_load, text_encoders=("text_encoder",), cascade=True,
    preprocess_prompt=preprocess_prompt,
)
