"""Peak GPU memory of SDXL DreamBooth at 1024x1024 px, computed on CPU: no GPU, no weights, no download.

Run: OMP_NUM_THREADS=1 python bench/sdxl_memory.py   (about 4 minutes on 2 CPU cores)

1. Builds the real diffusers `UNet2DConditionModel` from SDXL-base-1.0's published UNet config on
   the `meta` device (shapes and dtypes, no storage) and counts its parameters.
2. Replays one steady-state training step on meta tensors: forward under an emulation of CUDA bf16
   autocast, fp32 loss, backward, gradient clipping, optimizer step. Every storage the step
   allocates is followed until it is freed, rounded up to 512 bytes as the CUDA caching allocator
   does; the most bytes alive at once is what `torch.cuda.max_memory_allocated()` would report.
3. Checks the replay against a real CPU forward/backward of a tiny UNet, measured independently by
   the profiler's allocator events.

The replay machinery is shared with flux_memory.py (_memory_replay.py). The method, the table and
the caveats are in docs/sdxl-memory.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass

import torch
from _memory_replay import (
    CUDA_CONTEXT_GIB,
    GIB,
    MIB,
    OPTIMIZERS,
    EmulatedAutocast,
    LiveBytes,
    StepMemory,
    checkpoint_with,
    cpu_allocation_totals,
    gib,
    peak_of,
    storage_bytes,
)
from _memory_replay import replay_step as replay_model_step

LORA_RANK = 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (arguments at diffusers' defaults left out).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),   # diffusers' name for the number of heads: each head has 64 channels
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,   # pooled text 1280 + 6 time ids x 256
)
SDXL_UNET_PARAMS = 2_567_463_684   # the published checkpoint's count
SDXL_TEXT = (77, 1280)             # tokens of the text sequence, width of the pooled embedding

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: only used to cache latents, in fp32.
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=1024, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
)

# Small enough for a real CPU forward/backward in a second, with the same block kinds as SDXL's.
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
    use_linear_projection=True, norm_num_groups=16, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)
TINY_TEXT = (77, 32)

@dataclass(frozen=True)
class Setup:
    lora: bool
    checkpointing: bool
    rows: int                                   # 2: batch 1 with prior preservation (instance + class row)
    frozen_dtype: torch.dtype = torch.bfloat16  # of the UNet's base weights under LoRA

    @property
    def label(self) -> str:
        method = f"LoRA r{LORA_RANK}" if self.lora else "full"
        if self.lora and self.frozen_dtype == torch.float32:
            method += ", base fp32"
        return f"{method} | {'on' if self.checkpointing else 'off'}"


def build_unet(config: dict, lora: bool, frozen_dtype: torch.dtype, device: str = "meta"):
    """The UNet on `device`: all of it trained in fp32, or frozen in `frozen_dtype` with fp32 LoRA
    adapters."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if not lora:
        return unet.requires_grad_(True).train()
    unet.requires_grad_(False).to(frozen_dtype)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    for p in unet.parameters():
        # peft gives the adapters the base dtype: keep an fp32 master copy
        if p.requires_grad:
            p.data = p.data.float()
    return unet.train()


def make_batch(rows: int, config: dict, text: tuple[int, int], device: str) -> dict[str, torch.Tensor]:
    """Cached latents, noise, timesteps and cached text conditioning, as the training step gets them."""
    size, (tokens, pooled) = config["sample_size"], text
    x0 = torch.randn(rows, config["in_channels"], size, size, device=device)
    noise = torch.randn_like(x0)
    alpha = torch.rand(rows, 1, 1, 1, device=device)
    return dict(
        noisy=alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, target=noise,
        t=torch.randint(0, 1000, (rows,), device=device),
        text=torch.randn(rows, tokens, config["cross_attention_dim"], device=device),
        pooled=torch.randn(rows, pooled, device=device), time_ids=torch.randn(rows, 6, device=device),
    )


def loss_of(
    unet, batch: dict[str, torch.Tensor], autocast: contextlib.AbstractContextManager
) -> torch.Tensor:
    """Forward in autocast, then the fp32 loss, instance and class rows weighted alike."""
    with autocast:
        pred = unet(batch["noisy"], batch["t"], batch["text"],
                    added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}).sample
    pred = pred.float()                                             # accelerate's convert_outputs_to_fp32
    return (pred - batch["target"]).pow(2).flatten(1).mean(1).mean()   # per row [rows], then their mean


def replay_step(setup: Setup, config: dict = SDXL_UNET, text: tuple[int, int] = SDXL_TEXT,
                dtype: torch.dtype | None = torch.bfloat16, block: int = 512,
                attention: str = "cuda") -> dict[str, StepMemory]:
    """One steady-state training step of the UNet of `config` on meta tensors, for each optimizer
    (`_memory_replay.replay_step`)."""
    unet = build_unet(config, setup.lora, setup.frozen_dtype)
    if setup.checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_with(lambda: EmulatedAutocast(dtype, attention)))
    return replay_model_step(unet, functools.partial(make_batch, setup.rows, config, text, "meta"), loss_of,
                             EmulatedAutocast(dtype, attention), block)


def measured_on_cpu(setup: Setup, autocast: bool) -> tuple[int, int, int]:
    """A real CPU forward/backward of the tiny UNet, in fp32 or under CPU bf16 autocast.

    Measured by the profiler's allocator events, which see every allocation, kernel buffers
    included, and also followed by `LiveBytes`, which sees the tensors ops return.

    Returns:
        Bytes alive after the forward and peak bytes (profiler), peak bytes (`LiveBytes`).
    """
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    unet = build_unet(TINY_UNET, setup.lora, setup.frozen_dtype, device="cpu")
    if setup.checkpointing:
        unet.enable_gradient_checkpointing()              # diffusers' default, CPU's own attention
    tracker = LiveBytes("cpu", block=1)
    tracker.ignore_existing(list(unet.parameters()))
    marker = 123_457                                      # an allocation of this size marks the forward's end
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with tracker:
            batch = make_batch(setup.rows, TINY_UNET, TINY_TEXT, "cpu")
            context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            loss = loss_of(unet, batch, context)
            tracker.set_phase("backward")
            torch.empty(marker, dtype=torch.uint8)        # allocated and freed at once
            loss.backward()
            del loss, batch                               # free in the session all it allocated
        unet.zero_grad(set_to_none=True)
    # running sums: the allocator's total carries over between sessions
    sizes, totals = cpu_allocation_totals(prof)
    assert totals[-1] == 0, f"{totals[-1]} bytes allocated in the session outlive it"
    after_forward = next(total - size for size, total in zip(sizes, totals) if size == marker)
    return after_forward, max(totals), max(peak for peak, _ in tracker.peaks.values())


def sanity_check() -> list[tuple]:
    """The meta replay against real CPU allocations: tiny UNet, 2 rows. In fp32, and under bf16
    autocast (CPU's policy, emulated on meta as CUDA's is for SDXL: this checks the emulation)."""
    rows = []
    cases = [
        (lora, gc, autocast) for autocast in (False, True) for lora in (True, False) for gc in (False, True)
    ]
    for lora, checkpointing, autocast in cases:
        setup = Setup(lora, checkpointing, 2, torch.bfloat16 if autocast else torch.float32)
        meta = replay_step(setup, TINY_UNET, TINY_TEXT, dtype=torch.bfloat16 if autocast else None, block=1,
                           attention="cpu")["adamw"]
        after_forward_cpu, peak_cpu, peak_ops = measured_on_cpu(setup, autocast)
        label = f"{setup.label} | {'bf16 autocast' if autocast else 'fp32'}"
        rows.append((label, meta.saved, meta.activations, after_forward_cpu, meta.forward_backward_peak,
                     peak_ops, peak_cpu))
    return rows


def frozen_parts() -> dict[str, int]:
    """What the parts kept off the GPU during training cost when they are on it (caching, validation):
    the fp32 VAE's weights and the peak bytes of encoding one 1024x1024 image and of decoding one
    latent (no grad); the parameters of SDXL's two text encoders; the peak bytes of one sampling
    step of the UNet with classifier-free guidance (2 rows, bf16 autocast, no grad)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE)
        clip_l = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, hidden_act="quick_gelu",
            )
        )
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu"))
    unet = build_unet(SDXL_UNET, True, torch.bfloat16)

    def sample_step():
        batch = make_batch(2, SDXL_UNET, SDXL_TEXT, "meta")
        loss_of(unet, batch, EmulatedAutocast())

    with EmulatedAutocast(None):               # the flash attention stand-in only (see caveats)
        encode = peak_of(
            vae.parameters(),
            lambda: vae.encode(torch.empty(1, 3, 1024, 1024, device="meta")).latent_dist.mean,
        )
        decode = peak_of(
            vae.parameters(), lambda: vae.decode(torch.empty(1, 4, 128, 128, device="meta")).sample
        )
    return dict(
        vae_weights=storage_bytes(list(vae.parameters())), vae_encode=encode, vae_decode=decode,
        text_params=sum(p.numel() for m in (clip_l, clip_g) for p in m.parameters()),
        unet_sample_step=peak_of(unet.parameters(), sample_step),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--skip-sanity", action="store_true", help="skip the tiny-UNet check against real CPU memory"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    start = time.perf_counter()

    n_params = sum(p.numel() for p in build_unet(SDXL_UNET, False, torch.float32).parameters())
    print(f"SDXL UNet parameters: {n_params:,} (published checkpoint: {SDXL_UNET_PARAMS:,})")
    assert n_params == SDXL_UNET_PARAMS, "the inline config does not rebuild SDXL's UNet"

    print(
        "\nSDXL UNet, 1024x1024 px (latents 128x128), bf16 autocast. GiB = 2**30 bytes. Total = peak "
        f"allocated + {CUDA_CONTEXT_GIB} GiB CUDA context.\n"
    )
    print(
        "| method | grad. ckpt | optimizer | UNet rows | trained params | weights | grads | optimizer states "
        "| activations | peak allocated (when) | of which transient | total |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    setups = [Setup(lora, gc, rows) for lora in (True, False) for gc in (True, False) for rows in (1, 2)]
    setups += [Setup(True, gc, 2, torch.float32) for gc in (True, False)]
    checks = []
    for setup in setups:
        for kind, m in replay_step(setup).items():
            print(
                f"| {setup.label} | {OPTIMIZERS[kind]} | {setup.rows} | {m.trained / 1e6:,.1f} M | "
                f"{gib(m.weights)} "
                f"| {gib(m.grads)} | {gib(m.optimizer)} | {gib(m.activations)} | {gib(m.peak)} "
                f"({m.peak_phase}) "
                f"| {gib(m.transient)} | **{m.peak / GIB + CUDA_CONTEXT_GIB:.1f}** |", flush=True,
            )
        checks.append((f"{setup.label} | {setup.rows}", m.saved, m.saved_fp32, m.activations))
    print(f"\nOps the emulated autocast cast in the forward: {', '.join(sorted(m.cast_ops))}")
    print("\nSaved for backward (autograd hooks, once per storage, weights left out) against all the forward "
          "leaves alive, GiB:")
    for label, saved, fp32, activations in checks:
        print(f"  {label:32s} saved {gib(saved):>6s} (fp32: {gib(fp32):>5s})   alive after the forward "
              f"{gib(activations):>6s}")

    parts = frozen_parts()
    print(
        f"\nOff the GPU during training. VAE weights in fp32: {gib(parts['vae_weights'])} GiB; its peak on "
        f"top of them, encoding one 1024x1024 image: {gib(parts['vae_encode'])} GiB, decoding one latent: "
        f"{gib(parts['vae_decode'])} GiB. Text encoders: {parts['text_params']:,} parameters "
        f"({gib(2 * parts['text_params'])} GiB in bf16). One UNet sampling step with guidance (2 rows, no "
        f"grad) on top of its weights: {gib(parts['unet_sample_step'])} GiB."
    )

    if not args.skip_sanity:
        print("\nSanity check: tiny UNet, 2 rows, MiB. Meta replay against a real CPU run measured by the "
              "profiler's allocator events.\n")
        print("| method | grad. ckpt | precision | saved (hooks) | alive after forward: replay | measured "
              "| forward+backward peak: replay | real run, op outputs | measured |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for label, *values in sanity_check():
            print(f"| {label} | " + " | ".join(f"{v / MIB:.2f}" for v in values) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
