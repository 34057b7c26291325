"""FLUX.1 [dev] and [schnell]: one latent stage, a rectified-flow transformer, CLIP-L and T5-XXL.

The transformer denoises 16-channel VAE latents cut into 2x2 patches and packed into tokens of 64
values; its joint attention reads T5's token sequence, and CLIP's pooled output and the noise
level sigma modulate every block (diffusers' `FluxPipeline`, from Black Forest Labs' reference
code). FLUX.1 [dev] is guidance-distilled: a guidance value enters through an embedding instead
of classifier-free guidance (the pipeline's `guidance_scale`, 3.5 by default); FLUX.1 [schnell] is
timestep-distilled for 1-4 steps and has no guidance embedding. Both train with the rectified-flow
objective, its levels shifted as the model's own scheduler config shifts sampling (for [dev]:
dynamically, by the image's token count).

CLIP may train; T5-XXL (4.7B parameters) stays frozen, as in diffusers' and kohya's FLUX
trainers. Only LoRA adapters train: the 12B transformer with AdamW state does not fit one card
(`LORA_ONLY`), and `--quantize` shrinks the frozen base under the adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn

from dreambooth.config import FlowConfig, RunConfig
from dreambooth.models._latent import (
    encode_latent_distribution,
    load_pipeline,
    load_vae,
    sample_latents,
)
from dreambooth.models._quantize import METHODS, load_quantized_transformer
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

logger = logging.getLogger(__name__)

TRANSFORMER_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
"""The default of diffusers' `train_dreambooth_lora_flux.py`: every attention projection (the single
blocks' q, k, v included) and the double blocks' feed-forward layers. Not the single blocks'
`proj_mlp`/`proj_out`: peft matches names by suffix, and `proj_out` would also catch the final output
layer."""
LORA_TARGETS = {"transformer": TRANSFORMER_LORA_TARGETS, "text_encoder": CLIP_LORA_TARGETS}
MAX_SEQUENCE_LENGTH = 512
"""T5 tokens per prompt: `FluxPipeline`'s default, so that training sees the sequence length sampling does."""
DEV_GUIDANCE = 3.5
"""FLUX.1 [dev]'s sampling guidance: `FluxPipeline`'s default `guidance_scale`, as Black Forest Labs
recommend."""
PATCH = 2
"""Latent pixels per token side: FLUX packs 2x2 latent pixels into one token."""
LORA_ONLY = (
    "its 12B transformer needs ~200 GB to fine-tune in fp32 with AdamW (weights, gradients, two moments), "
    "beyond one card; LoRA adapters, over a base quantised with --quantize nf4 on small cards, are the way"
)
"""Why a FLUX model trains LoRA adapters only."""


@dataclass
class FluxStage:
    """FLUX's transformer with its VAE, its CLIP text encoder (may train) and its T5 encoder (frozen)."""

    pipeline: FluxPipeline
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    objective: FlowMatchingObjective
    resolution: int
    """Pixel size of training images, class images and validation samples (the pipeline samples at it)."""
    guidance: float = 1.0
    """Guidance value fed to the guidance embedding while training ([dev]; `--train-guidance`)."""
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    """T5 tokens per prompt."""
    name: str = "base"
    denoiser_name: str = "transformer"
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_TARGETS))
    default_guidance: float = DEV_GUIDANCE

    @property
    def tokenizers(self) -> tuple:
        # T5 first: the identifier is sampled from the first tokenizer's rare ids, and the paper's
        # range (ids 5000-10000) is T5-XXL's.
        return (self.pipeline.tokenizer_2, self.pipeline.tokenizer)

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer has a guidance embedding ([dev]) or not ([schnell])."""
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder_2": self.pipeline.text_encoder_2}

    def tokenize(self, prompts: list[str]) -> Tokens:
        # As FluxPipeline: CLIP padded to its 77 tokens, T5 to max_sequence_length; no attention masks.
        clip = tokenize(self.pipeline.tokenizer, prompts)
        t5 = tokenize(self.pipeline.tokenizer_2, prompts, max_length=self.max_sequence_length)
        return {"input_ids": clip["input_ids"], "input_ids_2": t5["input_ids"]}

    def encode_images(self, pixels: Tensor, framing: Framing) -> Encoded:
        return encode_latent_distribution(self.vae, pixels)

    def sample_x0(self, encoded: Encoded, rng: RowRandom) -> Tensor:
        return sample_latents(self.vae, encoded, rng)  # [b, 16, h/8, w/8], unpacked: the shift reads its size

    def encode_text(self, tokens: Tokens) -> TextConditioning:
        # As FluxPipeline.encode_prompt: T5's last hidden state is the sequence the transformer
        # attends to; CLIP contributes only its pooled output.
        clip, t5 = self.text_encoders["text_encoder"], self.pipeline.text_encoder_2
        sequence = t5(tokens["input_ids_2"].to(_device(t5)), output_hidden_states=False)[0]  # [b, seq, d_t5]
        # [b, d_clip]
        pooled = clip(tokens["input_ids"].to(_device(clip)), output_hidden_states=False).pooler_output
        return TextConditioning(sequence, pooled)

    def predict(
        self, noisy: Tensor, level: Tensor, text: TextConditioning, encoded: Encoded, rng: RowRandom
    ) -> Tensor:
        b, _, h, w = noisy.shape
        guidance = None
        if self.guidance_embeds:  # as the pipeline passes guidance_scale
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=pack_latents(noisy),                                  # [b, h/2 * w/2, 4c]
            # sigma: the pipeline passes t / 1000
            timestep=level.to(noisy.dtype),
            guidance=guidance,
            pooled_projections=text.pooled,
            encoder_hidden_states=text.sequence,
            txt_ids=torch.zeros(text.sequence.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(h // PATCH, w // PATCH, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        # [b, c, h, w], as the target noise - x0
        return unpack_latents(out, h, w)


def pack_latents(latents: Tensor) -> Tensor:
    """Latents [b, c, h, w] as tokens [b, (h/2)(w/2), 4c] of 2x2 patches (`FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens [b, (h/2)(w/2), 4c] back to latents [b, c, h, w] (`FluxPipeline._unpack_latents`, in latent
    pixels)."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    patches = tokens.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, h, w)


def image_ids(rows: int, cols: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """RoPE positions [rows * cols, 3] of the image tokens: (0, row, col)
    (`FluxPipeline._prepare_latent_image_ids`)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def native_resolution(pipeline: FluxPipeline) -> int:
    """The pixel size the model was made for: its VAE config's `sample_size` (1024 for FLUX.1 [dev] and
    [schnell], which is also `FluxPipeline`'s default), else the pipeline's default size."""
    size = pipeline.vae.config.get("sample_size")
    if isinstance(size, int) and size > 0 and size % (pipeline.vae_scale_factor * PATCH) == 0:
        return size
    return pipeline.default_sample_size * pipeline.vae_scale_factor


def load_flux(
    source: str, *, single_file_config: str | None = None, revision: str | None = None,
    variant: str | None = None, vae: str | None = None, quantize: str = "none",
    flow: FlowConfig | None = None, resolution: int | None = None, dtype: torch.dtype = torch.float32,
) -> list[FluxStage]:
    """Load a FLUX.1 pipeline (diffusers folder, hub id, or a single file with `single_file_config`).

    Everything loads in `dtype` on CPU, except that `quantize` ('nf4', 'int8', 'fp8') loads the
    transformer's linear layers quantised (onto the GPU), for LoRA training on top of them.

    Args:
        source: The model.
        single_file_config: For a single file: a local diffusers FLUX folder with its configs and tokenizers.
        revision, variant: Hub revision and weights variant.
        vae: A replacement VAE (folder, hub id or single file).
        quantize: 'none', or the quantisation of the frozen transformer.
        flow: The rectified-flow settings (density, weighting, training guidance); None: the defaults.
        resolution: Training and sampling size in pixels (a multiple of 16); None: `native_resolution`.

    Raises:
        ValueError: a bad resolution, or a quantisation this machine cannot do (names the flag and the
    install).
    """
    flow = flow or FlowConfig()
    if resolution is not None and resolution % 16:
        raise ValueError(
            f"--resolution {resolution}: FLUX needs a multiple of 16 pixels (8x VAE, 2x2 packing)"
        )
    kwargs = dict(dtype=dtype, **load_vae(vae, dtype))
    if quantize != "none":
        kwargs["transformer"] = load_quantized_transformer(
            FluxTransformer2DModel, source, single_file_config, quantize, revision=revision, variant=variant,
            dtype=dtype,
        )
    pipeline = load_pipeline(
        FluxPipeline, source, single_file_config, revision=revision, variant=variant, **kwargs
    )
    stage = stage_from_pipeline(pipeline, flow, resolution)
    if not stage.guidance_embeds:
        logger.warning(
            "%s has no guidance embedding (FLUX.1 [schnell]): it is timestep-distilled for 1-4 sampling "
            "steps, and "
            "fine-tuning with the flow-matching loss gradually undoes that distillation. Sample with more "
            "steps (20-28), keep runs short, and expect few-step samples to blur", source,
        )
    return [stage]


def stage_from_pipeline(
    pipeline: FluxPipeline, flow: FlowConfig | None = None, resolution: int | None = None
) -> FluxStage:
    """Wrap a loaded pipeline as a trainable stage; the pipeline then samples at the stage's resolution."""
    flow = flow or FlowConfig()
    size = resolution or native_resolution(pipeline)
    # FluxPipeline samples at default_sample_size * vae_scale_factor unless given height/width:
    # class images and validation samples come out at the size the stage trains at.
    pipeline.default_sample_size = size // pipeline.vae_scale_factor
    objective = FlowMatchingObjective.from_scheduler_config(
        pipeline.scheduler.config, density=flow.density, logit_mean=flow.logit_mean, logit_std=flow.logit_std,
        mode_scale=flow.mode_scale, weighting=flow.weighting, patch_size=PATCH,
    )
    dev = bool(pipeline.transformer.config.guidance_embeds)
    return FluxStage(
        pipeline=pipeline, denoiser=pipeline.transformer,
        text_encoders={"text_encoder": pipeline.text_encoder}, objective=objective, resolution=size,
        guidance=flow.guidance,
        default_guidance=DEV_GUIDANCE if dev else 0.0,  # [schnell]'s pipeline ignores guidance_scale
    )


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _load(source: ModelSource, cfg: RunConfig) -> list[FluxStage]:
    model = cfg.model
    return load_flux(
        source.base, single_file_config=model.single_file_config, revision=model.revision,
        variant=model.variant, vae=model.vae, quantize=model.quantize, flow=cfg.flow,
        resolution=cfg.subject.resolution, dtype=DTYPES[cfg.weights_dtype],
    )


FAMILY = Family(
    name="flux", pipeline_classes=("FluxPipeline",), load=_load, text_encoders=("text_encoder",), latent=True,
    single_file_marker=None, quantize=METHODS, lora_only=LORA_ONLY,
)
