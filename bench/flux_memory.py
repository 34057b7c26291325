"""Peak GPU memory of FLUX.1-dev LoRA DreamBooth, computed on CPU: no GPU, no weights, no download.

Run: OMP_NUM_THREADS=1 python bench/flux_memory.py   (about 5 minutes on 2 CPU cores)

1. Builds diffusers' `FluxTransformer2DModel` from FLUX.1-dev's published transformer config on the
   `meta` device and checks its parameter count (11,901,408,320).
2. Stores the frozen base as a LoRA run does: in bf16 (`training/loop.py` `_make_trainable`), or
   quantised as `--quantize nf4|int8` loads it (`models/_quantize.py`): diffusers' own bitsandbytes
   quantizer swaps every `nn.Linear` for a bitsandbytes `Linear4bit`/`Linear8bitLt`, and
   bitsandbytes' own quantisation code, run on meta through its fake kernels, gives the storage
   (NF4: half a byte per weight plus one fp32 absmax per 64; int8: one byte plus one fp32 scale per
   row). No bitsandbytes kernel can run here: the forward and backward run bitsandbytes' Python
   code on meta, and `BnbKernelBuffers` adds what its CUDA kernels allocate besides their outputs.
3. Adds fp32 LoRA adapters (rank 16, `models/flux.py`'s targets) and replays one training step
   (`_memory_replay.replay_step`: emulated CUDA bf16 autocast, fused attention, every storage
   followed from allocation to free), calling the transformer through `FluxStage.predict`, for
   512 and 1024 px, 1 and 2 rows, gradient checkpointing on and off, AdamW and 8-bit AdamW.
4. Computes the phases outside the training step that hold T5-XXL on the GPU: class images and the
   latent cache before training, validation sampling during it.

The method, the tables and the caveats are in docs/flux-memory.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import bitsandbytes as bnb
import torch
from _memory_replay import (
    CUDA_CONTEXT_GIB,
    GIB,
    OPTIMIZERS,
    EmulatedAutocast,
    MetaKernelCache,
    StepMemory,
    checkpoint_with,
    gib,
    peak_of,
    replay_step,
    storage_bytes,
)
from torch.utils._python_dispatch import TorchDispatchMode

from dreambooth.models._quantize import COMPUTE_DTYPE
from dreambooth.models.flux import MAX_SEQUENCE_LENGTH, TRANSFORMER_LORA_TARGETS, FluxStage
from dreambooth.models.spec import TextConditioning

LORA_RANK = 16
RESOLUTIONS = (512, 1024)
LATENT_CHANNELS, VAE_SCALE = 16, 8

# black-forest-labs/FLUX.1-dev transformer/config.json (arguments at diffusers' defaults left out).
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TRANSFORMER_PARAMS = 11_901_408_320   # the published checkpoint's count
CLIP_TOKENS, POOLED = 77, 768

# black-forest-labs/FLUX.1-dev vae/config.json: caches latents, decodes class and validation images; loads in
# the
# weights dtype (bf16 for a bf16 LoRA run) and stays on the GPU while training (`_store_frozen`).
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
FLUX_VAE_PARAMS = 83_819_683
# google/t5-v1_1-xxl (FLUX.1-dev text_encoder_2) and openai/clip-vit-large-patch14 (text_encoder).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
T5_XXL_PARAMS = 4_762_310_656
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_L_PARAMS = 123_060_480

BASES = {"bf16": "bf16", "nf4": "NF4", "int8": "int8"}
DIFFUSERS_RECIPE_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
"""LoRA targets of diffusers' FLUX QLoRA recipe (examples/research_projects/flux_lora_quantization), rank
4."""


def quantization_config(method: str):
    """`models/_quantize.py`'s `quantization_config` without its check for a CUDA GPU."""
    from diffusers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE_DTYPE
        )
    return BitsAndBytesConfig(load_in_8bit=True)


class BnbKernelBuffers(TorchDispatchMode):
    """The buffers bitsandbytes' CUDA kernels allocate besides their outputs (its meta "fake" kernels
    return the outputs alone), and LLM.int8's outlier columns, whose number depends on the data.

    - 4-bit matmul (`gemm_4bit`): the weight dequantised in the input's dtype, then `F.linear`
      (`backends/cuda/ops.py` `_dequant_linear_fallback`, bitsandbytes' path above 1,536 rows; below,
      a GPU-specific heuristic may pick its fused kernel, which needs no such buffer).
    - LLM.int8 (threshold 6.0, diffusers' default): the outlier search reads |A| >= 6 over the whole
      fp16 input; the product is accumulated in int32, then dequantised to fp16 and cast to the
      input's dtype (`backends/default/ops.py` `int8_scaled_mm`). Outlier columns are assumed absent:
      each would keep one more column of the input for backward.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "bitsandbytes::gemm_4bit":
            weight = torch.empty(tuple(args[2]), dtype=args[0].dtype, device=args[0].device)
            out = func(*args, **kwargs)
            del weight
            return out
        if name == "bitsandbytes::int8_vectorwise_quant" and (
            args[1] if len(args) > 1 else kwargs.get("threshold", 0)
        ):
            A = args[0]
            outliers = A.abs() >= 6.0
            columns = outliers.any(dim=0)
            del outliers, columns
            rows = A.numel() // A.shape[-1]
            return (torch.empty(A.shape, dtype=torch.int8, device=A.device),
                    torch.empty(rows, dtype=torch.float32, device=A.device),
                    torch.empty(0, dtype=torch.int64, device=A.device))
        if name == "bitsandbytes::int8_mixed_scaled_mm":
            A, CA, CB = args[:3]
            shape = (*CA.shape[:-1], CB.shape[0])
            accumulated = torch.empty(shape, dtype=torch.int32, device=A.device)
            dequantised = torch.empty(shape, dtype=torch.float16, device=A.device)
            del accumulated
            return dequantised.to(A.dtype), torch.empty(0, dtype=A.dtype, device=A.device)
        return func(*args, **kwargs)


def build_transformer(
    base: str, *, lora_rank: int | None = LORA_RANK, targets: tuple[str, ...] = TRANSFORMER_LORA_TARGETS,
    weights_dtype: torch.dtype = torch.bfloat16,
):
    """FLUX.1-dev's transformer on meta as a LoRA run holds it.

    Args:
        base: "bf16" or "fp32" (unquantised), or "nf4" or "int8" (`--quantize`: bitsandbytes, through
            diffusers' quantizer, from weights loaded in `weights_dtype`).
        lora_rank: rank of the fp32 adapters on `targets`, or None for none.
        weights_dtype: for a quantised base, the dtype the weights load in (`--weights-dtype auto`:
            bf16 for a bf16 LoRA run), which is that of the layers left unquantised and of NF4's
            dequantised weights.
    """
    from diffusers import FluxTransformer2DModel
    from diffusers.quantizers import DiffusersAutoQuantizer
    from peft import LoraConfig

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(base, weights_dtype)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_TRANSFORMER).to(dtype)
    model.requires_grad_(False)
    if base in ("nf4", "int8"):
        quantizer = DiffusersAutoQuantizer.from_config(quantization_config(base))
        quantizer.preprocess_model(model, device_map=None, keep_in_fp32_modules=[])
        for module in model.modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                module.weight.data = module.weight.data.to(dtype)
                module.weight._quantize("meta")     # bitsandbytes' own quantisation, on meta
                module.requires_grad_(False)
    if lora_rank is not None:
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                     target_modules=list(targets)))
        for p in model.parameters():
            if p.requires_grad:                 # `_make_trainable`: the adapters' fp32 master copy
                p.data = p.data.float()
    return model.train()


def quantization_state(model) -> list[torch.Tensor]:
    """The tensors besides parameters that hold quantised weights: NF4's absmax and code book, LLM.int8's row
    scales."""
    tensors = []
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
        elif isinstance(module, bnb.nn.Linear8bitLt):
            tensors += [t for t in (module.state.SCB, module.weight.SCB) if t is not None]
    return tensors


def text_conditioning(rows: int, dtype: torch.dtype) -> TextConditioning:
    """Cached text conditioning as the step gets it: T5's sequence [rows, 512, 4096] and CLIP's pooled
    output."""
    return TextConditioning(torch.randn(rows, MAX_SEQUENCE_LENGTH, FLUX_TRANSFORMER["joint_attention_dim"],
                                        device="meta", dtype=dtype),
                            torch.randn(rows, POOLED, device="meta", dtype=dtype))


def make_batch(rows: int, resolution: int, dtype: torch.dtype = torch.float32) -> dict:
    """Cached latents (mean, std), noise, levels and cached text conditioning, as `compute_loss` has them:
    in fp32, as the caches store them, or cast to `dtype` before the transformer (diffusers' recipe)."""
    size = resolution // VAE_SCALE
    mean = torch.randn(rows, LATENT_CHANNELS, size, size, device="meta")
    std = torch.rand_like(mean)
    x0 = mean + std * torch.randn_like(mean)                          # sample_latents (fp32)
    noise = torch.randn_like(x0)
    sigma = torch.rand(rows, device="meta")
    s = sigma.view(-1, 1, 1, 1)
    return dict(
        encoded=(mean, std), noisy=((1 - s) * x0 + s * noise).to(dtype), target=noise - x0, sigma=sigma,
        text=text_conditioning(rows, dtype),
    )


def denoiser(model, autocast):
    """`model` as accelerate wraps it under mixed precision: the forward in autocast, outputs to fp32."""

    def forward(**kwargs):
        with autocast:
            out = model(**kwargs)
        return tuple(t.float() for t in out)                        # accelerate's convert_outputs_to_fp32

    return forward


def loss_of(model, batch: dict, autocast) -> torch.Tensor:
    """`compute_loss` for FLUX: the transformer called as `FluxStage.predict` calls it, fp32 squared
    error per row, instance and class rows weighted alike."""
    stage = SimpleNamespace(denoiser=denoiser(model, autocast), guidance_embeds=True, guidance=1.0)
    prediction = FluxStage.predict(stage, batch["noisy"], batch["sigma"], batch["text"], {}, None)
    error = (prediction.float() - batch["target"].float()).pow(2).flatten(1).mean(1)   # [rows]
    return error.mean()


@dataclass(frozen=True)
class Setup:
    base: str
    checkpointing: bool
    resolution: int
    rows: int                # 2: batch 1 with prior preservation (instance + class row)


def warm_up(model) -> None:
    """One forward without grad, as the first step makes it: bitsandbytes casts a layer's bias to its
    input's dtype on first use and moves LLM.int8's weights into the layer's matmul state."""
    batch = make_batch(1, 512)
    with torch.no_grad():
        loss_of(model, batch, EmulatedAutocast())


def replay_training(setups: list[Setup], cache: MetaKernelCache, inputs: torch.dtype = torch.float32,
                    **build) -> tuple[dict[Setup, dict[str, StepMemory]], dict[str, torch.nn.Module]]:
    """The training step of each setup: one model per base, checkpointing switched per setup.

    Returns:
        The memory of each setup's step (by optimizer), and the model of each base.
    """
    results, models = {}, {}
    kernels = functools.partial(_kernels, cache)
    for base in dict.fromkeys(s.base for s in setups):
        model = models[base] = build_transformer(base, **build)
        with kernels():
            warm_up(model)
        state = quantization_state(model)
        for setup in (s for s in setups if s.base == base):
            if setup.checkpointing:
                model.enable_gradient_checkpointing(checkpoint_with(EmulatedAutocast))
            else:
                model.disable_gradient_checkpointing()
            batch = functools.partial(make_batch, setup.rows, setup.resolution, inputs)
            results[setup] = replay_step(
                model, batch, loss_of, EmulatedAutocast(), frozen_state=state, kernels=kernels
            )
        model.disable_gradient_checkpointing()
    return results, models


@contextlib.contextmanager
def _kernels(cache: MetaKernelCache | None):
    with BnbKernelBuffers(), (cache if cache is not None else contextlib.nullcontext()):
        yield


# --- Outside the training step: class images, caches, validation
# ------------------------------------------------


def build_frozen_parts() -> dict[str, torch.nn.Module]:
    """T5-XXL, CLIP-L and the VAE on meta, in bf16 as `load_flux` loads them for a bf16 LoRA run; their
    parameter counts checked."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        parts = dict(t5=T5EncoderModel(T5Config(**T5_XXL)), clip=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                     vae=AutoencoderKL(**FLUX_VAE))
    for name, expected in (("t5", T5_XXL_PARAMS), ("clip", CLIP_L_PARAMS), ("vae", FLUX_VAE_PARAMS)):
        found = sum(p.numel() for p in parts[name].parameters())
        assert found == expected, f"{name}: {found:,} parameters, the published checkpoint has {expected:,}"
    return {name: module.requires_grad_(False).eval().to(torch.bfloat16) for name, module in parts.items()}


def weight_bytes(model: torch.nn.Module, adapters: bool = True) -> int:
    """Bytes of a model's weights (quantisation state included), with or without its LoRA adapters."""
    params = [p for n, p in model.named_parameters() if adapters or "lora_" not in n]
    return storage_bytes([*params, *quantization_state(model)])


def sampling_peaks(parts: dict, transformer, rows: int, resolution: int, dtype: torch.dtype, autocast: bool,
                   cache: MetaKernelCache) -> dict[str, int]:
    """Peak bytes on top of the weights of each stage of `FluxPipeline` sampling `rows` images (no grad):
    T5 and CLIP encoding the prompts, one transformer step (guidance-distilled: one row per image),
    the VAE decoding the latents.

    Args:
        dtype: the pipeline's activations: T5's dtype (prompt embeddings and latents follow it).
        autocast: under bf16 autocast (`generate(autocast_dtype=...)`: validation) or not (class images).
    """
    context = EmulatedAutocast if autocast else functools.partial(EmulatedAutocast, None)
    size = resolution // VAE_SCALE
    tokens = (size // 2) ** 2

    def encode_t5():
        with context():
            parts["t5"](torch.zeros(rows, MAX_SEQUENCE_LENGTH, dtype=torch.long, device="meta"))

    def encode_clip():
        with context():
            parts["clip"](torch.zeros(rows, CLIP_TOKENS, dtype=torch.long, device="meta"))

    def step():
        text = text_conditioning(rows, dtype)
        with context():
            transformer(hidden_states=torch.randn(rows, tokens, 64, device="meta", dtype=dtype),
                        timestep=torch.rand(rows, device="meta", dtype=dtype),
                        guidance=torch.full((rows,), 3.5, device="meta"), pooled_projections=text.pooled,
                        encoder_hidden_states=text.sequence,
                        txt_ids=torch.zeros(MAX_SEQUENCE_LENGTH, 3, device="meta", dtype=dtype),
                        img_ids=torch.zeros(tokens, 3, device="meta", dtype=dtype), return_dict=False)

    def decode():
        with context():
            parts["vae"].decode(torch.randn(rows, LATENT_CHANNELS, size, size, device="meta", dtype=dtype))

    kernels = functools.partial(_kernels, cache)
    transformer.eval()
    peaks = dict(
        t5=peak_of(parts["t5"].parameters(), encode_t5),
        clip=peak_of(parts["clip"].parameters(), encode_clip),
        transformer=peak_of(
            [*transformer.parameters(), *quantization_state(transformer)], step, kernels=kernels
        ),
        vae=peak_of(parts["vae"].parameters(), decode),
    )
    transformer.train()
    return peaks


def encode_peak(vae, rows: int, resolution: int) -> int:
    """Peak bytes on top of the weights of `encode_examples`: `rows` images through the VAE encoder at once,
    in the VAE's dtype, and the latent distribution's mean and std made fp32
    (`encode_latent_distribution`)."""
    dtype = next(vae.parameters()).dtype

    def encode():
        dist = vae.encode(
            torch.empty(rows, 3, resolution, resolution, device="meta", dtype=dtype)
        ).latent_dist
        return dist.mean.float(), dist.std.float()

    with EmulatedAutocast(None):
        return peak_of(vae.parameters(), encode)


@dataclass(frozen=True)
class Phase:
    """Peak of a phase outside the training step: weights on the GPU, plus its largest stage."""

    name: str
    transformer: str
    resident: dict[str, int]         # bytes on the GPU throughout, by part
    stages: dict[str, int]           # peak bytes on top of `resident`, by stage

    @property
    def largest(self) -> str:
        return max(self.stages, key=self.stages.get)

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + self.stages[self.largest]


def phases(parts: dict, models: dict, training: dict, cache: MetaKernelCache) -> list[Phase]:
    """Class images and caches before training, and validation during it, as a bf16 LoRA run makes them.

    Before training, `finetune` moves the whole pipeline, loaded in bf16 (`--weights-dtype auto`),
    onto the GPU and samples the class images without autocast (`prior.batch_size` at a time);
    `encode_examples` then encodes 16 images at once with the VAE, and `encode_captions` the few
    distinct prompts with T5. While training, T5 and CLIP wait on the CPU and come back for
    validation, which samples under bf16 autocast next to the training state.
    """
    t5, clip, vae = parts["t5"], parts["clip"], parts["vae"]
    out = []

    def weights(module):
        return storage_bytes(list(module.parameters()))

    def resident(model, **more):
        return dict(
            t5=weights(t5), clip=weights(clip), transformer=weight_bytes(model, adapters=False),
            vae=weights(vae), **more,
        )

    encode = {resolution: encode_peak(vae, 16, resolution) for resolution in RESOLUTIONS}
    for base, model in models.items():
        model.disable_adapters()                # the frozen model makes the class images
        for rows in (1, 2, 8) if base == "nf4" else (1,):
            stages = sampling_peaks(parts, model, rows, 1024, torch.bfloat16, False, cache)
            out.append(Phase(f"class images, batch {rows}", BASES[base], resident(model), stages))
        for resolution in RESOLUTIONS:
            out.append(
                Phase(
                    f"latent cache: the VAE encodes 16 images at {resolution} px", BASES[base],
                    resident(model), dict(vae=encode[resolution]),
                )
            )
        model.enable_adapters()

    # Validation (flux_lora.toml: 3 prompts x 2 images, one batch of 6) next to 8-bit AdamW's training state.
    for base, model in models.items():
        step = training[Setup(base, True, 1024, 2)]["adamw8bit"]
        state = dict(
            t5=weights(t5), clip=weights(clip), transformer=step.weights, vae=weights(vae),
            optimizer=step.optimizer,
        )
        stages = sampling_peaks(parts, model, 6, 1024, torch.bfloat16, True, cache)
        out.append(Phase("validation during training, 6 images", BASES[base], state, stages))

    # `--mixed-precision no`, the config default: the weights load in fp32.
    for module in parts.values():
        module.to(torch.float32)
    model = build_transformer("fp32", lora_rank=None)
    stages = sampling_peaks(parts, model, 1, 1024, torch.float32, False, cache)
    out.append(Phase("class images, batch 1, --mixed-precision no", "fp32", resident(model), stages))
    for module in parts.values():
        module.to(torch.bfloat16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-cache", action="store_true",
                        help="also replay one setup without MetaKernelCache and check the figures are the "
                             "same")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    cache = MetaKernelCache()

    setups = [Setup(base, gc, resolution, rows) for base in BASES for gc in (True, False)
              for resolution in RESOLUTIONS for rows in (1, 2)]
    training, models = replay_training(setups, cache)
    n_params = sum(p.numel() for n, p in models["bf16"].named_parameters() if "lora_" not in n)
    print(
        f"FLUX.1-dev transformer parameters: {n_params:,} (published checkpoint: {FLUX_TRANSFORMER_PARAMS:,})"
    )
    assert n_params == FLUX_TRANSFORMER_PARAMS, "the inline config does not rebuild FLUX.1-dev's transformer"
    parts = build_frozen_parts()
    vae_bytes = storage_bytes(list(parts["vae"].parameters()))
    print_storage(models)

    print(
        f"\nLoRA r{LORA_RANK} on {', '.join(TRANSFORMER_LORA_TARGETS)}; bf16 autocast; T5 "
        f"{MAX_SEQUENCE_LENGTH} tokens; "
        f"GiB = 2**30 bytes. Peak allocated = step peak + the bf16 VAE the run keeps on the GPU "
        f"({gib(vae_bytes)} GiB). Total = peak allocated + {CUDA_CONTEXT_GIB} GiB CUDA context.\n"
    )
    print("| frozen base | grad. ckpt | px | rows | 8-bit AdamW | AdamW |")
    print("|---|---|---:|---:|---:|---:|")
    for s in setups:
        totals = [(training[s][kind].peak + vae_bytes) / GIB + CUDA_CONTEXT_GIB for kind in OPTIMIZERS]
        print(f"| {BASES[s.base]} | {'on' if s.checkpointing else 'off'} | {s.resolution} | {s.rows} | "
              + " | ".join(f"{t:.1f}" for t in totals) + " |")
    print(
        "\n| frozen base | grad. ckpt | px | rows | optimizer | trained params | weights | grads | optimizer "
        "states | activations | step peak (when) | of which transient | peak allocated | total |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in setups:
        for kind, m in training[s].items():
            print(
                f"| {BASES[s.base]} | {'on' if s.checkpointing else 'off'} | {s.resolution} | {s.rows} | "
                f"{OPTIMIZERS[kind]} "
                f"| {m.trained / 1e6:,.1f} M | {gib(m.weights)} | {gib(m.grads)} | {gib(m.optimizer)} "
                f"| {gib(m.activations)} | {gib(m.peak)} ({m.peak_phase}) | {gib(m.transient)} "
                f"| {gib(m.peak + vae_bytes)} | **{(m.peak + vae_bytes) / GIB + CUDA_CONTEXT_GIB:.1f}** |",
                flush=True,
            )
    casts = set().union(*(m.cast_ops for r in training.values() for m in r.values()))
    print(f"\nOps the emulated autocast cast in the forward: {', '.join(sorted(casts))}")
    print("Saved for backward (hooks) against alive after the forward, GiB, 2 rows at 1024 px:")
    for base in BASES:
        for gc in (True, False):
            m = training[Setup(base, gc, 1024, 2)]["adamw8bit"]
            print(
                f"  {BASES[base]:5s} ckpt {'on ' if gc else 'off'}  saved {gib(m.saved):>6s} (fp32 "
                f"{gib(m.saved_fp32):>6s})   alive after the forward {gib(m.activations):>6s}"
            )

    print_anchors(cache)

    print(
        "\nOutside the training step (1024 px unless the row says otherwise): the weights on the GPU, and "
        "the peak of each stage on top of them, GiB. Peak allocated = weights + the largest stage.\n"
    )
    print("| phase | transformer | T5 | CLIP | transformer weights | VAE | optimizer states | T5 encode "
          "| transformer step | VAE | peak allocated | total |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase in phases(parts, models, training, cache):
        r, st = phase.resident, phase.stages
        cells = [
            r["t5"], r["clip"], r["transformer"], r["vae"], r.get("optimizer"), st.get("t5"),
            st.get("transformer"), st["vae"],
        ]
        print(
            f"| {phase.name} | {phase.transformer} | "
            + " | ".join("-" if c is None else gib(c) for c in cells)
            + f" | {gib(phase.peak)} | **{phase.peak / GIB + CUDA_CONTEXT_GIB:.1f}** |", flush=True,
        )

    if args.check_cache:
        setup = Setup("nf4", True, 1024, 2)
        uncached, _ = replay_training([setup], None)
        assert uncached[setup] == training[setup], "MetaKernelCache changed the figures"
        print(
            "\nMetaKernelCache check: NF4, checkpointing, 1024 px, 2 rows replayed without it: same figures"
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


def print_storage(models: dict) -> None:
    """The frozen transformer's storage, replayed against the analytic count."""
    linear = [m for m in models["bf16"].modules() if isinstance(m, torch.nn.Linear) and not _is_adapter(m)]
    weights = sum(m.weight.numel() for m in linear)
    rows = sum(m.weight.shape[0] for m in linear)
    analytic = dict(
        bf16=2 * FLUX_TRANSFORMER_PARAMS, nf4=weights // 2 + 4 * (weights // 64), int8=weights + 4 * rows
    )
    print(
        "\nFrozen transformer storage, GiB: replayed (all weights, quantisation state, unquantised "
        f"parameters) against the analytic count of its {len(linear)} linear layers ({weights:,} weights):"
    )
    for base, model in models.items():
        print(
            f"  {BASES[base]:5s} {gib(weight_bytes(model, adapters=False))}   analytic {gib(analytic[base])} "
            + {
                "bf16": "(2 bytes per parameter)", "nf4": "(0.5 byte per weight + one fp32 absmax per 64)",
                "int8": "(1 byte per weight + one fp32 scale per output row)",
            }[base]
        )
    double = weights // 2 + weights // 64 + 4 * (weights // 64 // 256)
    print(f"  NF4 with double quantisation (bnb_4bit_use_double_quant, not set by models/_quantize.py): "
          f"{gib(double)} analytic (8-bit absmax per 64 weights + one fp32 per 256 blocks)")


def _is_adapter(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.nn.Parameter) and module.weight.requires_grad


def print_anchors(cache: MetaKernelCache) -> None:
    """diffusers' FLUX QLoRA recipe as published (rank 4 on attention, weights loaded in 16 bits, inputs cast
    to the compute dtype, VAE deleted after caching), and this repo's NF4 run with its inputs cast to bf16
    (the repo feeds the transformer fp32 latents and text from its caches)."""
    recipe = [Setup("nf4", True, resolution, 1) for resolution in RESOLUTIONS]
    steps, _ = replay_training(
        recipe, cache, inputs=torch.bfloat16, lora_rank=4, targets=DIFFUSERS_RECIPE_TARGETS
    )
    cast = Setup("nf4", True, 1024, 2)
    ours, _ = replay_training([cast], cache, inputs=torch.bfloat16)
    print("\nAnchors, 8-bit AdamW, gradient checkpointing, GiB (no VAE on the GPU in the recipe):")
    for setup in recipe:
        m = steps[setup]["adamw8bit"]
        print(
            f"  diffusers recipe (NF4, r4 on {', '.join(DIFFUSERS_RECIPE_TARGETS)}), {setup.resolution} px, "
            "1 row: "
            f"{m.trained / 1e6:.2f} M trained, weights {gib(m.weights)}, activations {gib(m.activations)}, "
            f"peak allocated {gib(m.peak)}"
        )
    m = ours[cast]["adamw8bit"]
    print(
        f"  this repo's NF4 run (r{LORA_RANK}), 1024 px, 2 rows, inputs cast to bf16: activations "
        f"{gib(m.activations)}, step peak {gib(m.peak)}"
    )


if __name__ == "__main__":
    main()
