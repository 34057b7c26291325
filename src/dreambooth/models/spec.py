"""What the trainer needs from a model, whatever its family.

A model is one or more `Stage`s: Stable Diffusion and SDXL have one (a latent denoiser); an
Imagen-like cascade (DeepFloyd IF, the pocket model) has a base stage and a super-resolution
stage, each trained as a separate unit. A family implements `Stage` as a small dataclass plus
functions, and brings its `Objective` (how examples are noised and what the denoiser must
predict); families share no base class. The training step, the loop, LoRA, checkpoints and
exports only use what is declared here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dreambooth.devices import to_device
from dreambooth.seeding import RowRandom

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Weights dtypes by their config names (`RunConfig.weights_dtype`)."""

Encoded = dict[str, Tensor]
"""Frozen per-image encodings computed once before training (latent moments, pixels, SDXL's time ids)."""

Tokens = dict[str, Tensor]
"""A batch of tokenized prompts, one entry per tokenizer input (e.g. 'input_ids', 'input_ids_2')."""

Framing = Tensor
"""How each training image was framed, [n, 4]: original height, original width, crop top, crop left
(pixels, the crop in the resized image). SDXL's micro-conditioning is made from it."""


@dataclass
class TextConditioning:
    """A prompt's text conditioning, as the family's denoiser consumes it.

    One cached prompt holds unbatched tensors; a batch holds them stacked. The loop and the text
    cache treat the fields as opaque tensors.
    """

    sequence: Tensor
    """Token embeddings [b, seq, d] (several encoders' concatenated where the family does so)."""
    pooled: Tensor | None = None
    """Pooled prompt embedding [b, d_pooled] (SDXL, SD3, FLUX), or None."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextConditioning:
        device = torch.device(device)
        return self._map(
            lambda t: to_device(t, device).to(dtype) if dtype is not None else to_device(t, device)
        )

    def unbind(self) -> list[TextConditioning]:
        """One unbatched conditioning per row."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rows = len(self.sequence)
        return [
            TextConditioning(**{k: (v[i] if v is not None else None) for k, v in fields.items()})
            for i in range(rows)
        ]

    @staticmethod
    def stack(items: Sequence[TextConditioning]) -> TextConditioning:
        """Stack unbatched conditionings into a batch."""
        names = [f.name for f in dataclasses.fields(TextConditioning)]
        columns = {n: [getattr(item, n) for item in items] for n in names}
        return TextConditioning(**{
            n: (torch.stack(v) if v[0] is not None else None) for n, v in columns.items()
        })

    def _map(self, fn) -> TextConditioning:
        return dataclasses.replace(
            self,
            **{f.name: fn(v) for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None},
        )


class Objective(Protocol):
    """How a family's denoiser is trained: noise levels, noised inputs, targets, per-sample weights.

    A "level" is whatever indexes the noise: an integer DDPM timestep, or a flow-matching sigma.
    """

    def draw_levels(self, rng: RowRandom, x0: Tensor) -> Tensor:
        """One noise level per row [b], from the rows' own generators (x0 gives shapes, e.g. for a shift)."""
        ...

    def noisy(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """The noised input x_t [b, ...]."""
        ...

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """What the denoiser must predict at `level` [b, ...]."""
        ...

    def weight(self, level: Tensor) -> Tensor:
        """Per-sample loss weight [b]."""
        ...

    def level_fraction(self, level: Tensor) -> Tensor:
        """Each level as a fraction of the noise range [b] in [0, 1] (the loss is logged by its quartile)."""
        ...


class Stage(Protocol):
    """One trainable denoiser and what the training step needs around it.

    The modules are the very objects inside `pipeline`, so the stock diffusers pipeline samples
    the weights being trained (validation) and saves them (export).
    """

    name: str
    """'base' (text-to-image) or 'sr' (super-resolution)."""
    pipeline: object
    """The stock diffusers pipeline that samples this stage."""
    denoiser: nn.Module
    """The network that denoises: a UNet or a transformer."""
    denoiser_name: str
    """The denoiser's component name in the pipeline ('unet', 'transformer'): LoRA files and checkpoints use
    it."""
    text_encoders: dict[str, nn.Module]
    """Text encoders that may train, by pipeline component name ('text_encoder', 'text_encoder_2')."""
    objective: Objective
    lora_targets: dict[str, tuple[str, ...]]
    """peft `target_modules` of each trainable component, by component name."""
    default_guidance: float
    """Classifier-free guidance this family samples with by default."""

    @property
    def resolution(self) -> int:
        """Pixel size of the images this stage generates and is trained on."""
        ...

    @property
    def tokenizers(self) -> tuple:
        """The tokenizers of its text encoders, in order (an identifier must suit all of them)."""
        ...

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules that never train (e.g. the VAE, a T5 encoder), by name."""
        ...

    def tokenize(self, prompts: list[str]) -> Tokens:
        """Tokenize prompts exactly as the family's pipeline does."""
        ...

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        """Frozen, deterministic encodings of images [b, 3, h, w] in [-1, 1]: cacheable."""
        ...

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        """The clean diffusion input x0 [b, c, h', w'] of a batch of encodings."""
        ...

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        """Text conditioning of tokenized prompts, as the pipeline computes it."""
        ...

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        """The denoiser's prediction of the objective's target [b, ...]."""
        ...


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: which family, and where each stage's pipeline lives."""

    family: str
    base: str
    sr: str | None = None
    upscaler: str | None = None
    """A cascade's third stage (the Stable Diffusion x4 upscaler), if it has one."""


@dataclass(frozen=True)
class Family:
    """A model family: the data the tool needs before loading, and the function that loads it."""

    name: str
    """Short name ('sd', 'sdxl', 'if'), recorded in run.json."""
    pipeline_classes: tuple[str, ...]
    """The `_class_name`s in `model_index.json` it trains."""
    load: Callable[..., list]
    """(source: ModelSource, cfg: RunConfig) -> its stages, in cascade order, fp32 on CPU."""
    text_encoders: tuple[str, ...]
    """Component names of the text encoders that may train (`--text-encoders` picks among them)."""
    cascade: bool = False
    """Several stages, saved as stage_1/, stage_2/."""
    single_file_marker: str | None = None
    """A key prefix only its original-layout single-file checkpoints have; None: it has no single file."""
    latent: bool = False
    """Denoises VAE latents (so `--vae` can replace the VAE)."""
    quantize: tuple[str, ...] = ()
    """The `--quantize` modes its loader implements for the frozen denoiser of a LoRA run (e.g. 'nf4',
    'int8')."""
    lora_only: str | None = None
    """Why it trains LoRA adapters only (said when full fine-tuning is asked for, e.g. FLUX's 12B
    transformer); None: both."""
    preprocess_prompt: Callable[[str], str] = str
    """What its pipelines do to a prompt before tokenizing it (IF lower-cases); training tokenizes the same
    text."""


def tokenize(tokenizer, prompts: list[str], max_length: int = 77) -> Tokens:
    """Tokenize prompts as the diffusers pipelines do (pad and truncate to `max_length`)."""
    out = tokenizer(
        prompts, padding="max_length", max_length=min(tokenizer.model_max_length, max_length),
        truncation=True, return_tensors="pt",
    )
    return {"input_ids": out.input_ids, "attention_mask": out.attention_mask}


def trainable_modules(stage: Stage, text_encoders: Iterable[str]) -> dict[str, nn.Module]:
    """The denoiser and the named text encoders, by component name (the keys checkpoints use)."""
    return {
        stage.denoiser_name: stage.denoiser, **{name: stage.text_encoders[name] for name in text_encoders},
    }


def with_modules(stage: Stage, modules: dict[str, nn.Module]) -> Stage:
    """A copy of `stage` whose forward passes go through `modules` (e.g. accelerate's wrappers)."""
    return dataclasses.replace(
        stage, denoiser=modules.get(stage.denoiser_name, stage.denoiser),
        text_encoders={name: modules.get(name, module) for name, module in stage.text_encoders.items()},
    )


def frozen_modules(stage: Stage, trained_text_encoders: Iterable[str]) -> dict[str, nn.Module]:
    """The modules that do not train in a run, by name: the family's frozen parts, and the frozen text
    encoders."""
    trained = set(trained_text_encoders)
    return {**stage.frozen_modules(), **{n: m for n, m in stage.text_encoders.items() if n not in trained}}


def is_text_encoder(name: str) -> bool:
    """Whether a pipeline component name is a text encoder's ('text_encoder', 'text_encoder_2', ...)."""
    return name.startswith("text_encoder")
