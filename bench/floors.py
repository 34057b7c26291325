"""Compute floor of one DreamBooth training step and of class-image sampling, counted on CPU: no GPU, no
weights, no download.

Run: OMP_NUM_THREADS=1 python bench/floors.py [--gpu H100] [--json floors.json]   (about 30 s on 2 CPU cores)

1. Builds the real diffusers / transformers classes from the published configs on the `meta` device
   (shapes and dtypes, no storage): the SD 1.5 UNet and VAE, the CLIP ViT-L/14 text model, the
   SDXL-base-1.0 UNet, and checks their parameter counts against the published checkpoints'.
2. Counts the FLOPs of one step with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions,
   attention; 2 FLOPs per multiply-add): the forward, then the backward of a meta loss as autograd runs
   it. Autograd computes no weight gradient for a frozen weight (LoRA's base) and no input gradient
   for an input that needs none (latents, cached text embeddings): the counter sees only what runs.
   A second count, from module shapes (nn.Linear, nn.Conv2d, diffusers Attention), checks it exactly.
3. Floor = FLOPs / peak dense bf16 tensor-core throughput + fused AdamW's memory traffic (28 bytes per
   trained parameter) / memory bandwidth, for each GPU of `GPUS` (spec-sheet figures). A lower bound:
   every FLOP at peak, every other op (norms, activations, casts, the data pipeline) free.

FLOPs do not depend on dtype, so the models run in fp32 on meta; the step they stand for runs under
bf16 autocast. The method, the table and the caveats are in docs/performance-floors.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from sdxl_memory import LORA_RANK, SDXL_TEXT, SDXL_UNET, SDXL_UNET_PARAMS, build_unet, loss_of, make_batch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Gpu:
    name: str                       # for --gpu
    label: str
    bf16_tflops: float
    """Peak dense (no 2:4 sparsity) bf16 tensor-core throughput with FP32 accumulate, 10**12 FLOP/s."""
    tb_per_s: float
    """Memory bandwidth, 10**12 bytes/s."""


# Spec sheets. NVIDIA lists bf16 "with sparsity" figures first; these are the dense halves.
# H100 SXM5: H100 datasheet (1,979 TFLOPS with sparsity) and Hopper whitepaper table (989.4 dense); HBM3 3.35
# TB/s.
# H200 SXM: H200 datasheet (1,979 with sparsity; the same GH100 part and clocks as H100 SXM5); HBM3e 4.8 TB/s.
#   A100 80GB SXM4: A100 datasheet (312 dense, 624 with sparsity); HBM2e 2,039 GB/s.
#   L40S: L40S datasheet (362.05 dense, 733 with sparsity); GDDR6 864 GB/s.
#   RTX 4090: Ada architecture whitepaper, appendix A, "Peak BF16 Tensor TFLOPS with FP32 Accumulate" 165.2
#     (330.4 with sparsity; GeForce runs FP16 accumulate at twice that, but training matmuls accumulate
#     in FP32); GDDR6X 1,008 GB/s.
#   RTX 3090: Ampere GA102 whitepaper, appendix A, "Peak BF16 Tensor TFLOPS with FP32 Accumulate" 71
#     (142 with sparsity); GDDR6X 936 GB/s.
GPUS = {g.name: g for g in (
    Gpu("H100", "H100 SXM", 989.4, 3.35), Gpu("H200", "H200 SXM", 989.4, 4.8),
    Gpu("A100", "A100 80GB SXM", 312.0, 2.039), Gpu("L40S", "L40S", 362.05, 0.864),
    Gpu("RTX4090", "RTX 4090", 165.2, 1.008), Gpu("RTX3090", "RTX 3090", 71.0, 0.936),
)}

# Fused AdamW, fp32 everything: reads param, grad, exp_avg, exp_avg_sq, writes param, exp_avg, exp_avg_sq.
ADAMW_BYTES_PER_PARAM = 4 * 4 + 3 * 4

# stable-diffusion-v1-5 unet/config.json (arguments at diffusers' defaults left out).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
    attention_head_dim=8,   # diffusers' name for the number of heads
)
SD15_UNET_PARAMS = 859_520_964
# tokens of the cached text sequence; a pooled width, which SD 1.5's UNet does not take
SD15_TEXT = (77, 768)

# openai/clip-vit-large-patch14 text model: SD 1.5's text encoder.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_L_TEXT_PARAMS = 123_060_480

# stable-diffusion-v1-5 vae/config.json: class images are decoded by it.
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD_VAE_PARAMS = 83_653_863

SAMPLING_STEPS = 25   # DPM++ 2M: one model evaluation per step

# From the performance issue: SimpleTuner's figures, ms per step on one H100, batch 1, LoRA.
# Each is set against the floor of the workload of the same model, resolution, method and batch.
PUBLISHED_H100_MS = {"w1-lora-b1": ("SimpleTuner, SD 1.5 LoRA, batch 1", 181.0),
                     "w2-b1": ("SimpleTuner, SDXL LoRA at 1024 px, batch 1", 606.0)}


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unet: dict
    text: tuple[int, int]
    rows: int                       # UNet batch: 2 = one instance + one class row (prior preservation)
    # LoRA (sdxl_memory.build_unet: r16 on to_q, to_k, to_v, to_out.0), base frozen
    lora: bool = False
    train_text: bool = False        # CLIP text encoder trained too (runs forward and backward each step)
    checkpointing: bool = False     # diffusers' gradient checkpointing: blocks recomputed in the backward


TRAINING = (
    Workload("w1", "W1 SD 1.5 full UNet, 512 px", SD15_UNET, SD15_TEXT, 2),
    Workload("w1-te", "W1 SD 1.5 full UNet + text encoder, 512 px", SD15_UNET, SD15_TEXT, 2, train_text=True),
    Workload("w1-lora", f"W1 SD 1.5 LoRA r{LORA_RANK}, 512 px", SD15_UNET, SD15_TEXT, 2, lora=True),
    Workload(
        "w1-lora-b1", f"W1 SD 1.5 LoRA r{LORA_RANK}, 512 px, batch 1", SD15_UNET, SD15_TEXT, 1, lora=True
    ),
    Workload("w2", f"W2 SDXL LoRA r{LORA_RANK}, 1024 px", SDXL_UNET, SDXL_TEXT, 2, lora=True),
    Workload(
        "w2-gc", f"W2 SDXL LoRA r{LORA_RANK}, 1024 px, grad. checkpointing", SDXL_UNET, SDXL_TEXT, 2,
        lora=True, checkpointing=True,
    ),
    Workload("w2-b1", f"W2 SDXL LoRA r{LORA_RANK}, 1024 px, batch 1", SDXL_UNET, SDXL_TEXT, 1, lora=True),
)


@dataclass(frozen=True)
class Count:
    key: str
    label: str
    rows: int
    forward: int                    # FLOPs
    backward: int
    attention_forward: int          # of `forward`: the attention matmuls (QK^T and PV)
    trained: int                    # trained parameters: what the optimizer updates
    # (forward, backward, attention forward) from module shapes
    by_shapes: tuple[int, int, int] | None = None

    @property
    def optimizer_bytes(self) -> int:
        return ADAMW_BYTES_PER_PARAM * self.trained

    @property
    def flash_recompute(self) -> int:
        """FLOPs a flash-attention backward adds by recomputing QK^T (none without a backward)."""
        return self.attention_forward // 2 if self.backward else 0


def build_text_encoder(device: str = "meta") -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))


def build_vae(device: str = "meta") -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**SD_VAE)


def n_params(model: nn.Module, trained_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trained_only)


@contextlib.contextmanager
def counted_by_shapes(model: nn.Module) -> Iterator[dict[str, int]]:
    """FLOPs of `model`'s matmuls and convolutions from module shapes, a count independent of the counter's.

    Forward: 2 x multiply-adds of every nn.Linear and nn.Conv2d, and 4 x b x q-tokens x kv-tokens x
    inner width for every diffusers Attention (QK^T, then PV). Backward: a layer's forward FLOPs once
    for the input gradient if its input requires grad, once for the weight gradient if its weight
    does; attention twice its forward (dP, dV, dQ, dK) when its output requires grad.

    Yields:
        FLOPs as the model runs: "forward", "backward", and "attention" (the part of forward in attention).
    """
    from diffusers.models.attention_processor import Attention

    tally = {"forward": 0, "backward": 0, "attention": 0}

    def add(flops: int, n_grads: int) -> None:
        tally["forward"] += flops
        tally["backward"] += n_grads * flops

    def on_linear(m: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        add(2 * args[0].numel() * m.out_features, args[0].requires_grad + m.weight.requires_grad)

    def on_conv(m: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        flops = 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        add(flops, args[0].requires_grad + m.weight.requires_grad)

    def on_attention(m: Attention, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        # [b, s, c] or [b, c, h, w]
        q_tokens = hidden.shape[1] if hidden.ndim == 3 else math.prod(hidden.shape[2:])
        kv_tokens = q_tokens if context is None else context.shape[1]
        flops = 4 * hidden.shape[0] * q_tokens * kv_tokens * m.inner_dim
        tally["attention"] += flops
        add(flops, 2 * out.requires_grad)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(on_linear))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(on_attention, with_kwargs=True))
    try:
        yield tally
    finally:
        for h in handles:
            h.remove()


class AttentionFlops(TorchFunctionMode):
    """FLOPs of the two matmuls (QK^T, then PV) of every `scaled_dot_product_attention` call, from its
    q, k, v shapes [b, heads, tokens, head width]. The counter sees attention as the matmuls that the
    meta device decomposes it into, bmm or mm depending on the shapes; this names them."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.flops += 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return func(*args, **(kwargs or {}))


def count(run: Callable[[Callable[[], None]], None]) -> tuple[int, int, int]:
    """Run `run(mark)` under the FLOP counter; `run` calls `mark()` where its forward ends (if it never
    does, all it runs is forward).

    Returns:
        FLOPs before the mark, FLOPs after it, and the attention FLOPs before it.
    """
    counter, attention = FlopCounterMode(display=False), AttentionFlops()
    marked: dict[str, int] = {}

    def mark() -> None:
        marked.update(total=counter.get_total_flops(), attention=attention.flops)

    with counter, attention:
        run(mark)
    if not marked:
        mark()
    return marked["total"], counter.get_total_flops() - marked["total"], marked["attention"]


def count_training_step(w: Workload) -> Count:
    """Forward and backward of one training step of `w` on meta tensors, as the counter sees them."""
    unet = build_unet(w.unet, w.lora, torch.float32)
    if w.checkpointing:
        unet.enable_gradient_checkpointing()
    text_encoder = build_text_encoder().requires_grad_(True).train() if w.train_text else None
    batch = make_batch(w.rows, w.unet, w.text, "meta")

    def step(mark: Callable[[], None]) -> None:
        if text_encoder is not None:
            ids = torch.zeros(w.rows, CLIP_L_TEXT["max_position_embeddings"], dtype=torch.long, device="meta")
            batch["text"] = text_encoder(ids).last_hidden_state                     # [rows, 77, 768]
        loss = loss_of(unet, batch, contextlib.nullcontext())
        mark()
        loss.backward()

    # The shape count follows the UNet only, and a checkpointed forward would run its hooks twice.
    checked = text_encoder is None and not w.checkpointing
    with counted_by_shapes(unet) if checked else contextlib.nullcontext() as by_shapes:
        forward, backward, attention = count(step)
    trained = n_params(unet, trained_only=True) + (n_params(text_encoder) if text_encoder is not None else 0)
    return Count(w.key, w.label, w.rows, forward, backward, attention, trained,
                 tuple(by_shapes.values()) if checked else None)


def count_sampling() -> tuple[Count, Count]:
    """Class-image generation with SD 1.5 at 512 px: one denoising step with classifier-free guidance
    (UNet on 2 rows: conditional and unconditional), and one image: SAMPLING_STEPS of them + VAE decode.
    The prompts are encoded once for all the class images, so the text encoder is left out."""
    unet = build_unet(SD15_UNET, False, torch.float32).requires_grad_(False).eval()
    vae = build_vae().requires_grad_(False).eval()
    batch = make_batch(2, SD15_UNET, SD15_TEXT, "meta")
    latents = torch.empty(1, SD_VAE["latent_channels"], 64, 64, device="meta")
    with torch.no_grad(), counted_by_shapes(unet) as unet_shapes, counted_by_shapes(vae) as vae_shapes:
        step, _, step_attention = count(lambda _: unet(batch["noisy"], batch["t"], batch["text"]))
        decode, _, decode_attention = count(lambda _: vae.decode(latents / SD_VAE["scaling_factor"]))
    one_step = Count("w3-step", "W3 SD 1.5 sampling, 1 denoising step with CFG, 512 px", 2, step, 0,
                     step_attention, 0, tuple(unet_shapes.values()))
    image = Count("w3-image", f"W3 SD 1.5 class image: {SAMPLING_STEPS} DPM++ steps + VAE decode", 2,
                  SAMPLING_STEPS * step + decode, 0, SAMPLING_STEPS * step_attention + decode_attention, 0,
                  tuple(SAMPLING_STEPS * n + m for n, m in zip(unet_shapes.values(), vae_shapes.values())))
    return one_step, image


def floor_ms(c: Count, gpu: Gpu) -> float:
    """FLOPs at peak tensor-core throughput, then the optimizer's bytes at full bandwidth: the optimizer
    step starts when the backward has ended, so the two add up."""
    return 1e3 * (c.forward + c.backward) / (gpu.bf16_tflops * 1e12) + 1e3 * c.optimizer_bytes / (
        gpu.tb_per_s * 1e12
    )


def check_parameter_counts() -> None:
    """Each model rebuilt from its inline config has the published checkpoint's parameter count."""
    expected = [("SD 1.5 UNet", build_unet(SD15_UNET, False, torch.float32), SD15_UNET_PARAMS),
                ("SDXL UNet", build_unet(SDXL_UNET, False, torch.float32), SDXL_UNET_PARAMS),
                ("CLIP ViT-L/14 text", build_text_encoder(), CLIP_L_TEXT_PARAMS),
                ("SD VAE", build_vae(), SD_VAE_PARAMS)]
    for name, model, published in expected:
        n = n_params(model)
        print(f"{name:20s} {n:>14,} parameters (published checkpoint: {published:,})")
        assert n == published, f"the inline config does not rebuild {name}"


def print_table(counts: list[Count], gpus: list[Gpu]) -> None:
    print(
        "| workload | UNet rows | trained params | forward TFLOP | backward TFLOP | total TFLOP | "
        "backward/forward | optimizer GB | " + " | ".join(f"{g.label} ms" for g in gpus) + " |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(gpus))
    for c in counts:
        ratio = f"{c.backward / c.forward:.2f}" if c.backward else "-"
        trained = f"{c.trained / 1e6:,.1f} M" if c.trained else "-"
        print(f"| {c.label} | {c.rows} | {trained} | {c.forward / 1e12:.3f} | {c.backward / 1e12:.3f} "
              f"| {(c.forward + c.backward) / 1e12:.3f} | {ratio} | {c.optimizer_bytes / 1e9:.2f} | "
              + " | ".join(f"{floor_ms(c, g):.2f}" for g in gpus) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--gpu", type=str.upper, choices=list(GPUS), help="only this GPU's floors (default: all)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the counts and floors to this JSON file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    start = time.perf_counter()

    check_parameter_counts()
    counts = [count_training_step(w) for w in TRAINING] + list(count_sampling())
    gpus = [GPUS[args.gpu]] if args.gpu else list(GPUS.values())

    print(
        "\nPer step. TFLOP = 10**12 FLOPs (matmuls, convolutions, attention; 2 per multiply-add). "
        "Optimizer: fused "
        f"AdamW, {ADAMW_BYTES_PER_PARAM} bytes per trained fp32 parameter, GB = 10**9 bytes. Floor = TFLOP "
        f"/ peak dense bf16 + optimizer bytes / bandwidth: a lower bound.\n"
    )
    print_table(counts, gpus)

    print("\nPeak figures (spec sheets, dense bf16 with FP32 accumulate): " + ", ".join(
        f"{g.label} {g.bf16_tflops:g} TFLOPS {g.tb_per_s:g} TB/s" for g in gpus))
    print(
        "\nNot in the floor: flash attention's backward recomputes QK^T (the count is of the math path, "
        "which keeps the attention matrix):"
    )
    for c in counts:
        if c.flash_recompute:
            print(f"  {c.label:58s} +{c.flash_recompute / 1e12:.3f} TFLOP "
                  f"(+{100 * c.flash_recompute / (c.forward + c.backward):.1f} %)")

    print(
        "\nCheck: the counter against a count from module shapes (nn.Linear, nn.Conv2d, diffusers "
        "Attention), TFLOP:"
    )
    for c in counts:
        if c.by_shapes is not None:
            counted = (c.forward, c.backward, c.attention_forward)
            print(
                f"  {c.label:58s} "
                + "   ".join(
                    f"{name} {n / 1e12:.4f} / {m / 1e12:.4f}"
                    for name, n, m in zip(("forward", "backward", "of which attention"), counted, c.by_shapes)
                )
            )
            assert counted == c.by_shapes, f"{c.label}: the counter and the shapes disagree"

    h100 = GPUS["H100"]
    print(f"\nPublished figures on an {h100.label} against the floor of the like workload:")
    by_key = {c.key: c for c in counts}
    for key, (source, ms) in PUBLISHED_H100_MS.items():
        floor = floor_ms(by_key[key], h100)
        print(f"  {source}: {ms:g} ms per step; floor ({by_key[key].label}) {floor:.2f} ms: "
              f"{ms / floor:.0f}x the floor (floor / measured = {100 * floor / ms:.1f} %)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpus": {n: asdict(g) for n, g in GPUS.items()},
                       "adamw_bytes_per_param": ADAMW_BYTES_PER_PARAM,
                       "workloads": [asdict(c) | {"optimizer_bytes": c.optimizer_bytes,
                                                  "flash_recompute": c.flash_recompute,
                                                  "floor_ms": {n: floor_ms(c, g) for n, g in GPUS.items()}}
                                     for c in counts],
                       "published_h100_ms": PUBLISHED_H100_MS}, f, indent=1)
        print(f"\nWrote {args.json}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
