"""Stable Diffusion 3 / 3.5 (Medium, Large): one latent stage, an MMDiT transformer trained by rectified flow.

The transformer's joint attention reads one token sequence made of two parts (Esser et al. 2024,
"Scaling Rectified Flow Transformers", Sec. 4): CLIP-L's and CLIP-G's penultimate hidden states
side by side, zero-padded to T5-XXL's width (77 tokens), followed by T5's last hidden states
(256 tokens by default); the two CLIPs' pooled, projected outputs, concatenated, join the timestep
embedding. Both CLIPs may train; T5 (4.7B parameters) stays frozen, as in diffusers' SD3 scripts.
The noise levels, targets and weights are the rectified-flow objective's (`flow_matching.py`),
with the static shift of the model's scheduler config (3.0 for SD3 and SD3.5).

The identifier is judged rare in T5's vocabulary, the tokenizer the paper's rare range {5000,
..., 10000} was defined in, and must be one whole token in both CLIP vocabularies too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import Tensor, nn

from dreambooth.config import FlowConfig, RunConfig
from dreambooth.models._latent import (
    encode_latent_distribution,
    load_pipeline,
    load_vae,
    sample_latents,
)
from dreambooth.models._quantize import load_quantized_transformer
from dreambooth.models.flow_matching import FlowMatchingObjective
from dreambooth.models.sd import CLIP_LORA_TARGETS
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

T5_MAX_LENGTH = 256
"""T5 tokens per prompt: StableDiffusion3Pipeline's default `max_sequence_length`, so the model trains
on the sequence it samples with (diffusers' SD3 DreamBooth scripts train on 77)."""

TRANSFORMER_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",                     # image stream
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",  # text (context) stream
)
"""The joint attention's projections of both streams: the default `--lora_layers` of diffusers'
train_dreambooth_lora_sd3.py. The adaLN modulation layers are left alone, as Stability's SD3.5
Large fine-tuning tutorial advises against anatomy degradation (quoted in diffusers' README_sd3.md),
and so are the feed-forward layers and SD3.5 Medium's extra image self-attention (`attn2`)."""

LORA_TARGETS = {
    "transformer": TRANSFORMER_LORA_TARGETS, "text_encoder": CLIP_LORA_TARGETS,
    "text_encoder_2": CLIP_LORA_TARGETS,
}

QUANTIZE_MODES = ("nf4", "int8")
"""`--quantize` modes: bitsandbytes 4-bit NormalFloat (QLoRA) or LLM.int8() for the frozen transformer
(`_quantize.py` has fp8 too; it is not offered here until a LoRA on fp8 SD3 weights has been run)."""


def default_guidance(transformer_config) -> float:
    """The classifier-free guidance each SD3 release is sampled with, told apart by its transformer config.

    SD3 Medium (no q/k norm): 7.0, diffusers' SD3 documentation. SD3.5 (RMS q/k norm): Stability's
    reference sampler (Stability-AI/sd3.5 `sd3_infer.py` CONFIGS): 5.0 for Medium (MMDiT-X, with
    dual-attention layers), 4.5 for Large. SD3.5 Large Turbo has Large's config but samples
    without guidance: pass --validation-guidance / --class-guidance 1 for it.
    """
    if transformer_config.get("qk_norm") is None:
        return 7.0
    return 5.0 if transformer_config.get("dual_attention_layers") else 4.5


@dataclass
class SD3Stage:
    """SD3's transformer with its VAE, its two trainable CLIP encoders and its frozen T5 encoder."""

    pipeline: StableDiffusion3Pipeline
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    objective: FlowMatchingObjective
    default_guidance: float
    resolution: int
    """Pixel size it trains at; the pipeline samples at it too (`stage_from_pipeline` sets its default
    size)."""
    name: str = "base"
    denoiser_name: str = "transformer"
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_TARGETS))
    max_sequence_length: int = T5_MAX_LENGTH
    """T5 tokens per prompt (the pipeline's `max_sequence_length`)."""

    @property
    def tokenizers(self) -> tuple:
        # T5 first: the identifier's rarity is judged in the first tokenizer, and the paper's
        # range (ids 5000-10000) is a T5-XXL range.
        return (self.pipeline.tokenizer_3, self.pipeline.tokenizer, self.pipeline.tokenizer_2)

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def t5(self) -> nn.Module:
        return self.pipeline.text_encoder_3

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder_3": self.t5}

    def tokenize(self, prompts: list[str]) -> Tokens:
        # As StableDiffusion3Pipeline: both CLIPs padded to CLIP-L's 77, T5 to max_sequence_length.
        clip_length = self.pipeline.tokenizer_max_length
        clip_l, clip_g = (
            tokenize(t, prompts, clip_length) for t in (self.pipeline.tokenizer, self.pipeline.tokenizer_2)
        )
        t5 = self.pipeline.tokenizer_3(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        return {
            "input_ids": clip_l["input_ids"], "input_ids_2": clip_g["input_ids"], "input_ids_3": t5.input_ids,
        }

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        return encode_latent_distribution(self.vae, pixels)

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        return sample_latents(self.vae, encoded, rng)  # (z - shift_factor) * scaling_factor

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        # As StableDiffusion3Pipeline.encode_prompt (no clip_skip, no attention masks).
        sequences, pooled = [], []
        for name, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
            encoder = self.text_encoders[name]
            out = encoder(tokens[key].to(next(encoder.parameters()).device), output_hidden_states=True)
            sequences.append(out.hidden_states[-2])  # [b, 77, d_l] and [b, 77, d_g]
            pooled.append(out[0])                    # projected text_embeds [b, p_l], [b, p_g]
        clip = torch.cat(sequences, dim=-1)
        t5 = self.t5(tokens["input_ids_3"].to(next(self.t5.parameters()).device))[0].to(
            clip.device, clip.dtype
        )  # [b, L, d_t5]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero features up to T5's width
        # [b, 77 + L, d_t5], [b, p_l + p_g]
        return TextConditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        # The pipeline passes the scheduler's timesteps, sigma * num_train_timesteps (0-1000).
        return self.denoiser(
            hidden_states=noisy, timestep=self.objective.timestep(level), encoder_hidden_states=text.sequence,
            pooled_projections=text.pooled,
        ).sample


def load_sd3(
    source: str, *, single_file_config: str | None = None, revision: str | None = None,
    variant: str | None = None, vae: str | None = None, quantize: str = "none",
    flow: FlowConfig | None = None, resolution: int | None = None, dtype: torch.dtype = torch.float32,
) -> list[SD3Stage]:
    """Load an SD3 / SD3.5 pipeline (diffusers folder, hub id, or a single file with `single_file_config`).

    Everything loads in `dtype` on CPU, except that `quantize` ('nf4', 'int8') loads the transformer's
    linear layers quantised by bitsandbytes (onto the GPU), for LoRA training on top of them.

    Args:
        source: The model.
        single_file_config: For a single file: a local diffusers SD3 folder of the same release (configs,
    tokenizers).
        revision, variant: Hub revision and weights variant.
        vae: A replacement VAE (folder, hub id or single file).
        quantize: 'none', or the quantisation of the frozen transformer.
        flow: The rectified-flow settings (density, weighting); None: the defaults.
        resolution: Training and sampling size in pixels (a multiple of 16); None: the transformer's
            native `sample_size` (1024 px for SD3 and SD3.5).

    Raises:
        ValueError: a bad resolution, or a quantisation this machine cannot do (names the flag and the
    install).
    """
    if quantize not in ("none", *QUANTIZE_MODES):
        raise ValueError(
            f"--quantize {quantize} is not offered for SD3: use {' or '.join(QUANTIZE_MODES)}, or drop the "
            "flag"
        )
    kwargs = dict(dtype=dtype, **load_vae(vae, dtype))
    if quantize != "none":
        kwargs["transformer"] = load_quantized_transformer(
            SD3Transformer2DModel, source, single_file_config, quantize, revision=revision, variant=variant,
            dtype=dtype,
        )
    pipeline = load_pipeline(
        StableDiffusion3Pipeline, source, single_file_config, revision=revision, variant=variant, **kwargs
    )
    return [stage_from_pipeline(pipeline, flow, resolution)]


def stage_from_pipeline(
    pipeline: StableDiffusion3Pipeline, flow: FlowConfig | None = None, resolution: int | None = None
) -> SD3Stage:
    """Wrap a loaded pipeline as a trainable stage; the pipeline then samples at the stage's resolution.

    Raises:
        ValueError: `resolution` is not a multiple of 16 pixels or exceeds the transformer's position
    embeddings.
    """
    flow = flow or FlowConfig()
    config, scale = pipeline.transformer.config, pipeline.vae_scale_factor
    # 16: 8x VAE, 2x2 patches
    size, step = resolution or config.sample_size * scale, config.patch_size * scale
    largest = (config.pos_embed_max_size or config.sample_size) * step
    if size % step or size > largest:
        raise ValueError(
            f"--resolution {size}: SD3 needs a multiple of {step} pixels (8x VAE, 2x2 latent patches) "
            f"up to {largest} (its position embeddings)"
        )
    # StableDiffusion3Pipeline samples at default_sample_size * vae_scale_factor unless given
    # height/width: class images and validation samples come out at the size the stage trains at.
    pipeline.default_sample_size = size // scale
    objective = FlowMatchingObjective.from_scheduler_config(
        pipeline.scheduler.config, density=flow.density, logit_mean=flow.logit_mean, logit_std=flow.logit_std,
        mode_scale=flow.mode_scale, weighting=flow.weighting, patch_size=config.patch_size,
    )
    return SD3Stage(
        pipeline=pipeline, denoiser=pipeline.transformer,
        text_encoders={"text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2},
        objective=objective, default_guidance=default_guidance(config), resolution=size,
    )


def _load(source: ModelSource, cfg: RunConfig) -> list[SD3Stage]:
    model = cfg.model
    return load_sd3(
        source.base, single_file_config=model.single_file_config, revision=model.revision,
        variant=model.variant, vae=model.vae, quantize=model.quantize, flow=cfg.flow,
        resolution=cfg.subject.resolution, dtype=DTYPES[cfg.weights_dtype],
    )


FAMILY = Family(
    name="sd3", pipeline_classes=("StableDiffusion3Pipeline",), load=_load,
    text_encoders=("text_encoder", "text_encoder_2"), latent=True, quantize=QUANTIZE_MODES,
)
