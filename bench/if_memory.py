"""Peak GPU memory of DeepFloyd IF DreamBooth (stage I at 64 px, stage II at 256 px), computed on CPU: no GPU,
no weights, no download.

Run: OMP_NUM_THREADS=1 python bench/if_memory.py   (about a minute on 2 CPU cores)

1. Builds diffusers' `UNet2DConditionModel` from IF-I-XL-v1.0's and IF-II-L-v1.0's published UNet configs, and
   transformers' `T5EncoderModel` from t5-v1_1-xxl's, on the `meta` device; checks their parameter counts.
2. Replays one steady-state training step of each configuration (`_memory_replay.replay_step`: emulated CUDA
bf16
   autocast, fused attention, every storage followed from its allocation to its free), calling the UNet as
   `IFBaseStage.predict` / `IFSuperResStage.predict` do. Prior preservation (1 instance row + 1 class row),
prompts
   cached (T5 on the CPU while the step runs), only the trained stage on the GPU (`finetune`).
3. Computes the phases outside the step that bring more onto the GPU: class images (the cascade up to the last
   trained stage, T5 included) and validation during training (T5 and the stages before the trained one, next
to
   its training state).

The replay machinery and its check against a real CPU run are docs/sdxl-memory.md's; the figures and the
caveats are in docs/if-memory.md.
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
    MetaKernelCache,
    StepMemory,
    checkpoint_with,
    cpu_allocation_totals,
    gib,
    peak_of,
    replay_step,
    storage_bytes,
)

from dreambooth.models.deepfloyd_if import LORA_TARGETS, upscale

LORA_RANK = 16
ROWS = 2                   # batch 1 with prior preservation: an instance row and a class row
TOKENS = 77                # `spec.tokenize`: T5 prompts padded to 77 tokens, as IF's pipelines do
# images per sampling batch: prior.batch_size, and `generate.sampling_batch` at 64 and 256 px
SAMPLING_BATCH = 8

_IF_UNET = dict(           # what both IF UNets share
    act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=64, attention_head_dim=64,
    cross_attention_norm="group_norm", encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", out_channels=6, resnet_time_scale_shift="scale_shift",
)
# DeepFloyd/IF-I-XL-v1.0 unet/config.json, arguments at diffusers' defaults left out. The gated repo is not
# readable
# here; the values are those of two public copies that name it as their origin (huggingface.co/ara77/ifxl and
# lucostiguy11/dreambooth_if, "_name_or_path": "DeepFloyd/IF-I-XL-v1.0"). The count below is 4.3B, the model
# card's,
# and 2 bytes per parameter give the 8.61 GB of its fp16 UNet file.
IF_I_UNET = dict(
    _IF_UNET, sample_size=64, in_channels=3, block_out_channels=(704, 1408, 2112, 2816),
    cross_attention_dim=2816, layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
)
IF_I_PARAMS = 4_304_695_110
# DeepFloyd/IF-II-L-v1.0 unet/config.json, from huggingface.co/williamberman/dreambooth_me_upscale
# ("_name_or_path":
# "DeepFloyd/IF-II-L-v1.0"); up_block_types mirror down_block_types, as diffusers' scripts/convert_if.py
# builds them,
# and sample_size is the 256 px the stage samples at. 1.2B parameters on the model card.
IF_II_UNET = dict(
    _IF_UNET, sample_size=256, in_channels=6, block_out_channels=(160, 320, 640, 960, 1280),
    cross_attention_dim=1280, layers_per_block=(2, 2, 3, 5, 5), class_embed_type="timestep",
    mid_block_scale_factor=1.4142271248762552, resnet_out_scale_factor=1.4142271248762552,
    resnet_skip_time_act=True,
    down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3,
)
IF_II_PARAMS = 1_187_608_070
UNETS = {"I": IF_I_UNET, "II": IF_II_UNET}
PARAMS = {"I": IF_I_PARAMS, "II": IF_II_PARAMS}
# google/t5-v1_1-xxl's encoder, IF's text_encoder (the numbers of flux_memory.py's T5_XXL).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
T5_XXL_PARAMS = 4_762_310_656

# Small enough for a real CPU forward/backward in a second, with IF's block kinds: resnets with scale-shift
# time
# conditioning, SimpleCrossAttn blocks (self-attention with the text's added keys and values), the text's
# attention
# pooling, and stage II's class embedding of the augmentation level.
TINY_UNET = dict(
    _IF_UNET, sample_size=32, in_channels=6, block_out_channels=(32, 64), cross_attention_dim=64,
    layers_per_block=1, encoder_hid_dim=48, attention_head_dim=8, addition_embed_type_num_heads=4,
    norm_num_groups=16, class_embed_type="timestep",
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
)


@dataclass(frozen=True)
class Setup:
    stage: str               # "I" (64 px) or "II" (256 px)
    lora: bool               # LoRA r16 on a bf16 base, or every UNet weight trained in fp32
    checkpointing: bool

    @property
    def label(self) -> str:
        return f"stage {self.stage} {f'LoRA r{LORA_RANK}' if self.lora else 'full'}"


def build_unet(
    config: dict, lora: bool, frozen_dtype: torch.dtype = torch.bfloat16, device: str = "meta"
) -> torch.nn.Module:
    """The UNet of `config` as `_make_trainable` holds it: fully trained in fp32, or frozen in `frozen_dtype`
    with fp32 LoRA adapters on `deepfloyd_if.LORA_TARGETS` (attention q, k, v, out and the text's added k,
    v)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if not lora:
        return unet.requires_grad_(True).train()
    unet.requires_grad_(False).to(frozen_dtype)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS["unet"])))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet.train()


def build_t5(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    return t5.requires_grad_(False).eval().to(dtype)


def make_batch(config: dict, rows: int = ROWS, device: str = "meta") -> dict[str, torch.Tensor]:
    """The step's inputs as `compute_loss` makes them on the GPU: cached pixels and prompts (fp32), noise,
    levels; for a super-resolution stage (6 input channels) the real low-res image at a quarter of the size,
    upscaled and noise-augmented, concatenated to the noisy image."""
    size = config["sample_size"]
    x0 = torch.randn(rows, 3, size, size, device=device)
    noise = torch.randn_like(x0)
    alpha = torch.rand(rows, 1, 1, 1, device=device)
    noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    batch = dict(t=torch.randint(0, 1000, (rows,), device=device), noise=noise, input=noisy, level=None,
                 text=torch.randn(rows, TOKENS, config["encoder_hid_dim"], device=device))
    if config["in_channels"] == 6:
        upscaled = upscale(torch.randn(rows, 3, size // 4, size // 4, device=device), size)
        augmented = alpha.sqrt() * upscaled + (1 - alpha).sqrt() * torch.randn_like(upscaled)
        batch.update(
            input=torch.cat([noisy, augmented], dim=1), level=torch.randint(0, 250, (rows,), device=device)
        )
    return batch


def loss_of(unet, batch: dict, autocast) -> torch.Tensor:
    """`compute_loss` for an IF stage: the UNet under accelerate's autocast, its output made fp32
    (`convert_outputs_to_fp32`), the epsilon channels against the noise, fp32 squared error per row, then the
    mean."""
    with autocast:
        out = unet(
            batch["input"], batch["t"], encoder_hidden_states=batch["text"], class_labels=batch["level"]
        ).sample
    epsilon = out.float()[:, :3]
    return (epsilon - batch["noise"]).pow(2).flatten(1).mean(1).mean()


def replay_training(
    setups: list[Setup], cache: MetaKernelCache
) -> tuple[dict[Setup, dict[str, StepMemory]], dict]:
    """The step of each setup (by optimizer); one UNet per (stage, method), checkpointing switched per
    setup."""
    results, unets = {}, {}
    for key in dict.fromkeys((s.stage, s.lora) for s in setups):
        unet = unets[key] = build_unet(UNETS[key[0]], key[1])
        for setup in (s for s in setups if (s.stage, s.lora) == key):
            if setup.checkpointing:
                unet.enable_gradient_checkpointing(checkpoint_with(EmulatedAutocast))
            else:
                unet.disable_gradient_checkpointing()
            results[setup] = replay_step(
                unet, functools.partial(make_batch, UNETS[setup.stage]), loss_of, EmulatedAutocast(),
                kernels=lambda: cache,
            )
        unet.disable_gradient_checkpointing()
    return results, unets


def measured_on_cpu(lora: bool, checkpointing: bool, autocast: bool) -> tuple[int, int]:
    """A real CPU forward/backward of the tiny UNet (2 rows), in fp32 or under CPU bf16 autocast, measured by
    the profiler's allocator events (every allocation, kernel buffers included), as sdxl_memory.py measures
    SDXL's.

    Returns:
        Bytes alive after the forward, and the peak bytes.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    unet = build_unet(TINY_UNET, lora, torch.float32, device="cpu")
    if checkpointing:
        unet.enable_gradient_checkpointing()              # diffusers' default, CPU's own attention
    marker = 123_457                                      # an allocation of this size marks the forward's end
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        batch = make_batch(TINY_UNET, device="cpu")
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        loss = loss_of(unet, batch, context)
        torch.empty(marker, dtype=torch.uint8)            # allocated and freed at once
        loss.backward()
        del loss, batch                                   # free in the session all it allocated
        unet.zero_grad(set_to_none=True)
    # running sums: the allocator's total carries over between sessions
    sizes, totals = cpu_allocation_totals(prof)
    return next(total - size for size, total in zip(sizes, totals) if size == marker), max(totals)


def sanity_check() -> list[tuple]:
    """The meta replay against real CPU allocations, tiny UNet, 2 rows: in fp32, and under bf16 autocast
    (CPU's policy, emulated on meta as CUDA's is for IF: this checks the emulation on IF's blocks). LoRA's
    frozen base is fp32 here: under CPU autocast, which leaves layer_norm alone, the text pooling's bf16
    LayerNorm would meet an fp32 input (CUDA autocast runs layer_norm in fp32)."""
    rows = []
    for autocast in (False, True):
        for lora in (True, False):
            for checkpointing in (False, True):
                dtype = torch.bfloat16 if autocast else None
                unet = build_unet(TINY_UNET, lora, torch.float32)
                if checkpointing:
                    unet.enable_gradient_checkpointing(
                        checkpoint_with(functools.partial(EmulatedAutocast, dtype, "cpu"))
                    )
                meta = replay_step(
                    unet, functools.partial(make_batch, TINY_UNET), loss_of, EmulatedAutocast(dtype, "cpu"),
                    block=1,
                )["adamw"]
                after_forward, peak = measured_on_cpu(lora, checkpointing, autocast)
                label = (f"{'LoRA r16, base fp32' if lora else 'full'} | "
                         f"{'on' if checkpointing else 'off'} | {'bf16 autocast' if autocast else 'fp32'}")
                rows.append((label, meta.activations, after_forward, meta.forward_backward_peak, peak))
    return rows


# --- Outside the training step: class images, validation
# ------------------------------------------------------


def sampling_peaks(t5, unets: dict, images: int, autocast: bool, cache: MetaKernelCache) -> dict[str, int]:
    """Peak bytes on top of the weights of each part of `IFPipeline` + `IFSuperResolutionPipeline` sampling
    `images` images (no grad): T5 encoding the prompts (then the empty negative prompts, separately), one UNet
    step with classifier-free guidance (2 rows per image), in the dtype the pipelines give their inputs
    (T5's).

    Args:
        unets: the stages sampled, by name ("I", "II").
        autocast: under bf16 autocast (validation: `generate(autocast_dtype=...)`) or not (class images).
    """
    context = EmulatedAutocast if autocast else functools.partial(EmulatedAutocast, None)
    dtype = next(t5.parameters()).dtype
    rows = 2 * images

    # without the attention mask (its [n, 1, 77, 77] bias is small): transformers reads it with .item()
    def encode():
        with context():
            t5(torch.zeros(images, TOKENS, dtype=torch.long, device="meta"))

    def step(stage):
        unet, size = unets[stage], UNETS[stage]["sample_size"]
        channels = UNETS[stage]["in_channels"]
        level = torch.full((rows,), 250, device="meta") if stage == "II" else None
        with context():
            unet(
                torch.randn(rows, channels, size, size, device="meta", dtype=dtype),
                torch.tensor(999, device="meta"),
                encoder_hidden_states=torch.randn(rows, TOKENS, 4096, device="meta", dtype=dtype),
                class_labels=level,
            )

    kernels = lambda: cache  # noqa: E731
    peaks = {"T5": peak_of(t5.parameters(), encode, kernels=kernels)}
    for stage, unet in unets.items():
        unet.eval()
        peaks[f"UNet {stage}"] = peak_of(unet.parameters(), functools.partial(step, stage), kernels=kernels)
        unet.train()
    return peaks


@dataclass(frozen=True)
class Phase:
    """A phase outside the training step: what it holds on the GPU throughout, and the peak of each part it
    runs on top."""

    name: str
    resident: dict[str, int]
    parts: dict[str, int]

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + max(self.parts.values())


def weights(module: torch.nn.Module) -> int:
    return storage_bytes(list(module.parameters()))


def phases(training: dict, unets: dict, cache: MetaKernelCache) -> list[Phase]:
    """Class images and validation, as `finetune` makes them now.

    The LoRA run (configs/if_cascade.toml: both stages, weights loaded in bf16) samples its class images with
    T5 and both UNets on the GPU, without autocast; validating stage I brings T5 next to stage I's training
    state (gradients freed, AdamW states kept), validating stage II brings T5 and stage I (bf16, with its
    trained adapters). A full fine-tune of stage I (--stages base: its class images are stage I's) loads every
    weight in fp32; `train_stage` casts the frozen T5 to bf16, so validation meets it in bf16.
    """
    out = []
    lora_i, lora_ii = unets[("I", True)], unets[("II", True)]
    t5 = build_t5(torch.bfloat16)
    frozen = {
        stage: build_unet(config, False).requires_grad_(False).to(torch.bfloat16)
        for stage, config in UNETS.items()
    }
    for batch in (SAMPLING_BATCH, SAMPLING_BATCH // 2):  # --class-batch-size 8 (the default), 4
        parts = sampling_peaks(t5, frozen, batch, False, cache)
        out.append(
            Phase(
                f"LoRA run: class images, {batch} a batch (T5, I, II in bf16)",
                {"T5": weights(t5), "UNet I": weights(frozen["I"]), "UNet II": weights(frozen["II"])}, parts,
            )
        )
    parts = sampling_peaks(t5, {"I": frozen["I"]}, SAMPLING_BATCH, False, cache)
    out.append(Phase(f"LoRA run, --stages base: class images, {SAMPLING_BATCH} a batch (T5, I in bf16)",
                     {"T5": weights(t5), "UNet I": weights(frozen["I"])}, parts))
    del frozen
    step_i = training[Setup("I", True, True)]["adamw"]
    parts = sampling_peaks(t5, {"I": lora_i}, SAMPLING_BATCH, True, cache)
    out.append(
        Phase(
            "LoRA run: validating stage I",
            {"T5": weights(t5), "stage I training": step_i.weights + step_i.optimizer}, parts,
        )
    )
    step_ii = training[Setup("II", True, True)]["adamw"]
    parts = sampling_peaks(t5, {"I": lora_i, "II": lora_ii}, SAMPLING_BATCH, True, cache)
    out.append(
        Phase(
            "LoRA run: validating stage II",
            {
                "T5": weights(t5), "UNet I": weights(lora_i),
                "stage II training": step_ii.weights + step_ii.optimizer,
            },
            parts,
        )
    )

    t5.to(torch.float32)
    full_i = unets[("I", False)]
    parts = sampling_peaks(t5, {"I": full_i}, SAMPLING_BATCH, False, cache)
    out.append(Phase(f"full run (stage I): class images, {SAMPLING_BATCH} a batch (T5, I in fp32)",
                     {"T5": weights(t5), "UNet I": weights(full_i)}, parts))
    t5.to(torch.bfloat16)
    for kind in OPTIMIZERS:
        step = training[Setup("I", False, True)][kind]
        parts = sampling_peaks(t5, {"I": full_i}, SAMPLING_BATCH, True, cache)
        out.append(Phase(f"full run (stage I, {OPTIMIZERS[kind]}): validating stage I",
                         {"T5": weights(t5), "stage I training": step.weights + step.optimizer}, parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--skip-sanity", action="store_true", help="skip the tiny-UNet check against real CPU memory"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    cache = MetaKernelCache()

    setups = [
        Setup("I", True, True), Setup("I", True, False), Setup("I", False, True), Setup("I", False, False),
        Setup("II", True, True), Setup("II", True, False),
    ]
    training, unets = replay_training(setups, cache)
    for stage in UNETS:
        found = sum(p.numel() for n, p in unets[(stage, True)].named_parameters() if "lora_" not in n)
        print(f"IF-{stage} UNet parameters: {found:,} (expected {PARAMS[stage]:,})")
        assert found == PARAMS[stage], f"the inline config does not rebuild IF-{stage}'s UNet"
    t5_params = sum(p.numel() for p in build_t5(torch.bfloat16).parameters())
    assert t5_params == T5_XXL_PARAMS, (
        f"T5-XXL: {t5_params:,} parameters, the published checkpoint has {T5_XXL_PARAMS:,}"
    )

    fp32 = {name: 4 * n for name, n in (("I", IF_I_PARAMS), ("II", IF_II_PARAMS), ("T5", T5_XXL_PARAMS))}
    print(
        "\nWeights alone, GiB. Every stage in fp32 with its own T5 (what `load_if` loaded, and `finetune` "
        "moved onto the "
        f"GPU before anything trained): {gib(fp32['I'] + fp32['II'] + 2 * fp32['T5'])}. In bf16 with one "
        f"T5: {gib((fp32['I'] + fp32['II'] + fp32['T5']) // 2)}. UNet I / UNet II / T5: "
        f"{gib(fp32['I'])} / {gib(fp32['II'])} / {gib(fp32['T5'])} fp32, "
        f"{gib(fp32['I'] // 2)} / {gib(fp32['II'] // 2)} / {gib(fp32['T5'] // 2)} bf16."
    )

    print(
        f"\nThe training step: batch 1 + prior preservation = {ROWS} rows, prompts cached (T5 on the CPU), "
        f"bf16 autocast. GiB = 2**30 bytes. Total = peak allocated + {CUDA_CONTEXT_GIB} GiB CUDA context.\n"
    )
    print(
        "| configuration | px | grad. ckpt | optimizer | trained params | weights | grads | optimizer states "
        "| activations | peak allocated (when) | total |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in setups:
        for kind, m in training[s].items():
            print(
                f"| {s.label} | {UNETS[s.stage]['sample_size']} | {'on' if s.checkpointing else 'off'} | "
                f"{OPTIMIZERS[kind]} "
                f"| {m.trained / 1e6:,.1f} M | {gib(m.weights)} | {gib(m.grads)} | {gib(m.optimizer)} "
                f"| {gib(m.activations)} | {gib(m.peak)} ({m.peak_phase}) | "
                f"**{m.peak / GIB + CUDA_CONTEXT_GIB:.1f}** |", flush=True,
            )
    casts = set().union(*(m.cast_ops for r in training.values() for m in r.values()))
    print(f"\nOps the emulated autocast cast in the forward: {', '.join(sorted(casts))}")

    print(
        "\nOutside the training step: what each phase holds on the GPU, and the largest peak of the parts it "
        "runs on top (sampling: one UNet step with guidance, or T5 encoding the prompts), GiB.\n"
    )
    print("| phase | on the GPU | largest part on top | peak allocated | total |")
    print("|---|---|---|---:|---:|")
    outside = {phase.name: phase for phase in phases(training, unets, cache)}
    for phase in outside.values():
        held = ", ".join(f"{name} {gib(b)}" for name, b in phase.resident.items())
        part = max(phase.parts, key=phase.parts.get)
        print(f"| {phase.name} | {held} | {part} {gib(phase.parts[part])} | {gib(phase.peak)} "
              f"| **{phase.peak / GIB + CUDA_CONTEXT_GIB:.1f}** |", flush=True)

    # Before: `finetune` moved every stage onto the GPU first, and each stage had its own T5 (bf16 in the LoRA
    # run);
    # `train_stage` sent the trained stage's T5 back to the CPU, validation brought every part back.
    t5, unet_ii = fp32["T5"] // 2, fp32["II"] // 2
    before = {
        "class images, 8 a batch": outside[
            f"LoRA run: class images, {SAMPLING_BATCH} a batch (T5, I, II in bf16)"
        ].peak
        + t5,
        "stage I step (checkpointing, AdamW)": training[Setup("I", True, True)]["adamw"].peak + t5 + unet_ii,
        "validating stage II": outside["LoRA run: validating stage II"].peak + t5,
    }
    print(
        "\nThe LoRA run before one T5 and one stage on the GPU at a time (each stage's T5 and every stage on "
        "the GPU throughout), total GiB: "
        + ", ".join(f"{k} {v / GIB + CUDA_CONTEXT_GIB:.1f}" for k, v in before.items())
    )
    if not args.skip_sanity:
        print(
            "\nSanity check: tiny IF UNet, 2 rows, MiB. Meta replay against a real CPU run measured by the "
            "profiler's allocator events.\n"
        )
        print(
            "| method | grad. ckpt | precision | alive after forward: replay | measured | forward+backward "
            "peak: replay | measured |"
        )
        print("|---|---|---|---:|---:|---:|---:|")
        for label, *values in sanity_check():
            print(f"| {label} | " + " | ".join(f"{v / MIB:.2f}" for v in values) + " |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
