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

The method, the table and the caveats are in docs/sdxl-memory.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GIB, MIB = 2**30, 2**20
CUDA_CONTEXT_GIB = 0.5        # CUDA context + cuBLAS/cuDNN handles: outside max_memory_allocated
LORA_RANK = 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
OPTIMIZERS = {"adamw8bit": "8-bit AdamW", "adamw": "AdamW"}

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
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
)

# Small enough for a real CPU forward/backward in a second, with the same block kinds as SDXL's.
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
    cross_attention_dim=64, use_linear_projection=True, norm_num_groups=16,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)
TINY_TEXT = (77, 32)

# The ops CUDA autocast casts, by name (torch.amp docs, "CUDA Ops that can autocast to ...").
AUTOCAST_LOWER = frozenset((
    "__matmul__ addbmm addmm addmv addr baddbmm bmm chain_matmul multi_dot conv1d conv2d conv3d conv_transpose1d "
    "conv_transpose2d conv_transpose3d linear matmul mm mv prelu einsum scaled_dot_product_attention"
).split())
AUTOCAST_FP32 = frozenset((
    "__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh cosine_embedding_loss "
    "cdist cosine_similarity cross_entropy cumprod cumsum dist erfinv exp expm1 group_norm hinge_embedding_loss "
    "kl_div l1_loss layer_norm log log_softmax log10 log1p log2 margin_ranking_loss mse_loss multilabel_margin_loss "
    "multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow prod reciprocal rsqrt sinh smooth_l1_loss "
    "soft_margin_loss softmax softmin softplus sum renorm tan triplet_margin_loss"
).split())

# CPU autocast's policy for the ops a UNet calls (probed: it leaves group_norm and layer_norm alone).
CPU_AUTOCAST_LOWER = frozenset((
    "__matmul__ addbmm addmm baddbmm bmm mm conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d "
    "linear matmul prelu scaled_dot_product_attention"
).split())
CPU_AUTOCAST_FP32 = frozenset("mse_loss l1_loss nll_loss cross_entropy kl_div binary_cross_entropy_with_logits".split())


class EmulatedAutocast(TorchFunctionMode):
    """CUDA `torch.autocast(dtype=torch.bfloat16)` for tensors on any device (here: meta).

    A CPU build has no CUDA autocast, and CPU autocast has another op policy (it leaves group_norm
    and layer_norm in bf16), so the casts are made here, by op name, at the functional level where
    autograd records them: the floating inputs of the lower-precision ops become bf16, those of the
    fp32 ops fp32, other ops run in their inputs' dtypes. As in autocast, the bf16 copy of an fp32
    leaf that requires grad (a trained weight) is made once and kept until the context exits;
    other tensors are cast at each use. `scaled_dot_product_attention` runs as a fused flash kernel,
    which saves q, k, v, the output and the log-sum-exp for backward (on meta it would otherwise
    take the math path, which saves the whole attention matrix).

    Args:
        dtype: the autocast dtype, or None for no casts (the flash attention only).
        attention: "cuda" for the CUDA flash kernel, "cpu" for the one CPU picks in
            `scaled_dot_product_attention` (same saved tensors, without the dropout RNG state).
            It also selects the op policy: CUDA autocast's, or CPU autocast's for the sanity check.
    """

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, attention: str = "cuda"):
        super().__init__()
        self.dtype, self.attention = dtype, attention
        self.lower, self.fp32 = (
            (AUTOCAST_LOWER, AUTOCAST_FP32) if attention == "cuda" else (CPU_AUTOCAST_LOWER, CPU_AUTOCAST_FP32)
        )
        self.weight_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cast_ops: set[str] = set()

    def __exit__(self, *exc):
        self.weight_copies.clear()
        return super().__exit__(*exc)

    def _cast(self, t, to: torch.dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (to, torch.float64):
            return t
        if to != torch.float32 and t.is_leaf and t.requires_grad:
            if id(t) not in self.weight_copies:
                self.weight_copies[id(t)] = (t, t.to(to))
            return self.weight_copies[id(t)][1]
        return t.to(to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        eligible = kwargs.get("dtype") is None and kwargs.get("out") is None
        if self.dtype is not None and eligible and (name in self.lower or name in self.fp32):
            to = self.dtype if name in self.lower else torch.float32
            args, kwargs = tree_map(lambda t: self._cast(t, to), (args, kwargs))
            self.cast_ops.add(name)
        if func is F.scaled_dot_product_attention:
            return _flash_attention(self.attention, *args, **kwargs)
        return func(*args, **kwargs)


def _flash_attention(kernel, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    assert attn_mask is None and not enable_gqa, "SDXL's attention has no mask"
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


class LiveBytes(TorchDispatchMode):
    """Follows every storage on `device` that ops allocate while active, until it is freed.

    Storages that exist before (weights, optimizer states) are the baseline and are not counted.
    A storage counts once, however many views share it.

    Args:
        device: the device type whose memory is followed ("meta" stands for the GPU).
        block: allocation granularity in bytes (512 for the CUDA caching allocator, 1 for CPU).
    """

    def __init__(self, device: str, block: int = 512):
        super().__init__()
        self.device, self.block = device, block
        self.uid = itertools.count()
        self.live: dict[int, tuple[int, int]] = {}      # storage address -> (uid, bytes); uid -1: baseline
        self.events: list[tuple[int, int]] = []        # (uid, +bytes when allocated | -bytes when freed)
        self.now = 0
        self.phase = "forward"
        self.peaks: dict[str, tuple[int, int]] = {}    # phase -> (most bytes alive, index of that event)

    def ignore_existing(self, tensors) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            if storage._cdata not in self.live:
                self.live[storage._cdata] = (-1, 0)
                weakref.finalize(storage, self._freed, storage._cdata)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = (self.now, len(self.events) - 1)

    def uid_of(self, t: torch.Tensor) -> int:
        return self.live[t.untyped_storage()._cdata][0]

    def live_uids(self, at_event: int | None = None) -> set[int]:
        """The storages alive after event `at_event` (None: now)."""
        alive: set[int] = set()
        for uid, delta in self.events[: None if at_event is None else at_event + 1]:
            (alive.add if delta > 0 else alive.discard)(uid)
        return alive

    def bytes_of(self, uids: set[int]) -> int:
        sizes = {uid: delta for uid, delta in self.events if delta > 0}
        return sum(sizes[uid] for uid in uids)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                self._allocated(t.untyped_storage())
        return out

    def _allocated(self, storage) -> None:
        key = storage._cdata
        if key in self.live:
            return
        size = -(-storage.nbytes() // self.block) * self.block
        uid = next(self.uid)
        self.live[key] = (uid, size)
        weakref.finalize(storage, self._freed, key)
        self.events.append((uid, size))
        self.now += size
        if self.now > self.peaks.get(self.phase, (-1, 0))[0]:
            self.peaks[self.phase] = (self.now, len(self.events) - 1)

    def _freed(self, key: int) -> None:
        uid, size = self.live.pop(key)
        if uid >= 0:
            self.events.append((uid, -size))
            self.now -= size


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """Sums the bytes autograd saves for backward, once per storage, leaving out the baseline (weights).

    Storages are told apart by `tracker`'s ids (an address can be reused once freed). Blind inside
    checkpointed blocks: there checkpoint's own hooks take over.
    """

    def __init__(self, tracker: LiveBytes):
        self.seen: set[int] = set()
        self.bytes = self.fp32_bytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            uid, size = tracker.live.get(t.untyped_storage()._cdata, (-1, 0))
            if uid >= 0 and uid not in self.seen:
                self.seen.add(uid)
                self.bytes += size
                self.fp32_bytes += size if t.dtype == torch.float32 else 0
            return t

        super().__init__(pack, lambda t: t)


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


@dataclass(frozen=True)
class StepMemory:
    trained: int             # parameters
    weights: int             # bytes, as every other field
    grads: int
    optimizer: int
    saved: int               # saved for backward by autograd (hooks; blind inside checkpointed blocks)
    saved_fp32: int          # of `saved`: fp32 tensors
    activations: int         # alive when the forward returns: saved tensors, checkpoint inputs, batch, loss
    peak: int                # weights + optimizer states + most bytes the step has alive at once
    peak_phase: str
    peak_grads: int          # part of `peak`: gradients alive at that moment
    peak_activations: int    # part of `peak`: what the forward left, still alive at that moment
    forward_backward_peak: int   # most step bytes alive at once before the optimizer step
    cast_ops: frozenset[str]     # the ops whose inputs the forward's autocast cast

    @property
    def transient(self) -> int:
        return self.peak - self.weights - self.optimizer - self.peak_grads - self.peak_activations


def checkpoint_with(recompute_context):
    """diffusers' default gradient checkpointing (non-reentrant `torch.utils.checkpoint`), recomputing
    each block inside `recompute_context()` as checkpoint re-enters the forward's autocast state."""

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), recompute_context()),
        )

    return checkpointed


def build_unet(config: dict, lora: bool, frozen_dtype: torch.dtype, device: str = "meta"):
    """The UNet on `device`: all of it trained in fp32, or frozen in `frozen_dtype` with fp32 LoRA adapters."""
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
        if p.requires_grad:                    # peft gives the adapters the base dtype: keep an fp32 master copy
            p.data = p.data.float()
    return unet.train()


def build_optimizer(params: list[torch.nn.Parameter], kind: str) -> torch.optim.Optimizer:
    """The optimizer with its states allocated, as after its first step.

    AdamW runs its foreach implementation, the default for CUDA tensors.
    """
    if kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return optimizer
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    for index, p in enumerate(params):
        optimizer.init_state(optimizer.param_groups[0], p, 0, index)
    return optimizer


def state_tensors(optimizer: torch.optim.Optimizer, device: str) -> list[torch.Tensor]:
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return [t for t in tensors if t.device.type == device]


def storage_bytes(tensors, block: int = 512) -> int:
    unique = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(-(-n // block) * block for n in unique.values())


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


def loss_of(unet, batch: dict[str, torch.Tensor], autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """Forward in autocast, then the fp32 loss, instance and class rows weighted alike."""
    with autocast:
        pred = unet(batch["noisy"], batch["t"], batch["text"],
                    added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}).sample
    pred = pred.float()                                             # accelerate's convert_outputs_to_fp32
    return (pred - batch["target"]).pow(2).flatten(1).mean(1).mean()   # per row [rows], then their mean


def replay_step(setup: Setup, config: dict = SDXL_UNET, text: tuple[int, int] = SDXL_TEXT,
                dtype: torch.dtype | None = torch.bfloat16, block: int = 512,
                attention: str = "cuda") -> dict[str, StepMemory]:
    """One steady-state training step on meta tensors, followed byte by byte, for each optimizer.

    Steady state: the optimizer states exist and the gradients start as None (`zero_grad(set_to_none=True)`).
    The forward and backward are the same for both optimizers; 8-bit AdamW updates each parameter
    in place, so only AdamW's step allocates (its foreach implementation).
    """
    unet = build_unet(config, setup.lora, setup.frozen_dtype)
    if setup.checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_with(lambda: EmulatedAutocast(dtype, attention)))
    params = list(unet.parameters())
    trained = [p for p in params if p.requires_grad]
    optimizers = {kind: build_optimizer(trained, kind) for kind in OPTIMIZERS}
    states = {kind: state_tensors(optimizer, "meta") for kind, optimizer in optimizers.items()}
    tracker = LiveBytes("meta", block)
    tracker.ignore_existing([*params, *itertools.chain(*states.values())])
    saved = SavedForBackward(tracker)
    with tracker:
        batch = make_batch(setup.rows, config, text, "meta")
        autocast = EmulatedAutocast(dtype, attention)
        with saved:
            loss = loss_of(unet, batch, autocast)
        after_forward = tracker.live_uids()
        tracker.set_phase("backward")
        loss.backward()
        del loss, batch
        grads = {tracker.uid_of(p.grad) for p in trained}
        tracker.set_phase("clip")
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        tracker.set_phase("AdamW step")
        optimizers["adamw"].step()
        optimizers["adamw"].zero_grad(set_to_none=True)

    weights = storage_bytes(params, block)
    results = {}
    for kind in OPTIMIZERS:
        phases = ("forward", "backward", "clip") + (("AdamW step",) if kind == "adamw" else ())
        phase = max(phases, key=lambda p: tracker.peaks[p][0])
        peak, event = tracker.peaks[phase]
        at_peak = tracker.live_uids(event)
        optimizer = storage_bytes(states[kind], block)
        results[kind] = StepMemory(
            trained=sum(p.numel() for p in trained), weights=weights, grads=tracker.bytes_of(grads),
            optimizer=optimizer, saved=saved.bytes, saved_fp32=saved.fp32_bytes, activations=tracker.bytes_of(after_forward),
            peak=weights + optimizer + peak, peak_phase={"AdamW step": "step", "clip": "step"}.get(phase, phase),
            peak_grads=tracker.bytes_of(at_peak & grads), peak_activations=tracker.bytes_of(at_peak & after_forward),
            forward_backward_peak=max(tracker.peaks["forward"][0], tracker.peaks["backward"][0]),
            cast_ops=frozenset(autocast.cast_ops),
        )
    return results


def measured_on_cpu(setup: Setup, autocast: bool) -> tuple[int, int, int]:
    """A real CPU forward/backward of the tiny UNet, in fp32 or under CPU bf16 autocast.

    Measured by the profiler's allocator events, which see every allocation, kernel buffers
    included, and also followed by `LiveBytes`, which sees the tensors ops return.

    Returns:
        Bytes alive after the forward and peak bytes (profiler), peak bytes (`LiveBytes`).
    """
    from torch._C._profiler import _EventType
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
    events = []

    def walk(event) -> None:
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            events.append((event.start_time_ns, event.typed[1].alloc_size))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    # Running sums of the sizes (frees are negative): the allocator's own running total carries over
    # between profiling sessions.
    sizes = [size for _, size in sorted(events)]
    totals = list(itertools.accumulate(sizes))
    assert totals[-1] == 0, f"{totals[-1]} bytes allocated in the session outlive it"
    after_forward = next(total - size for size, total in zip(sizes, totals) if size == marker)
    return after_forward, max(totals), max(peak for peak, _ in tracker.peaks.values())


def sanity_check() -> list[tuple]:
    """The meta replay against real CPU allocations: tiny UNet, 2 rows. In fp32, and under bf16
    autocast (CPU's policy, emulated on meta as CUDA's is for SDXL: this checks the emulation)."""
    rows = []
    cases = [(lora, gc, autocast) for autocast in (False, True) for lora in (True, False) for gc in (False, True)]
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
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu"))
    unet = build_unet(SDXL_UNET, True, torch.bfloat16)

    def peak_of(module, run) -> int:
        tracker = LiveBytes("meta")
        tracker.ignore_existing(list(module.parameters()))
        with tracker, torch.no_grad():
            run()
        return max(peak for peak, _ in tracker.peaks.values())

    def sample_step():
        batch = make_batch(2, SDXL_UNET, SDXL_TEXT, "meta")
        loss_of(unet, batch, EmulatedAutocast())

    with EmulatedAutocast(None):               # the flash attention stand-in only (see caveats)
        encode = peak_of(vae, lambda: vae.encode(torch.empty(1, 3, 1024, 1024, device="meta")).latent_dist.mean)
        decode = peak_of(vae, lambda: vae.decode(torch.empty(1, 4, 128, 128, device="meta")).sample)
    return dict(
        vae_weights=storage_bytes(list(vae.parameters())), vae_encode=encode, vae_decode=decode,
        text_params=sum(p.numel() for m in (clip_l, clip_g) for p in m.parameters()),
        unet_sample_step=peak_of(unet, sample_step),
    )


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-sanity", action="store_true", help="skip the tiny-UNet check against real CPU memory")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    start = time.perf_counter()

    n_params = sum(p.numel() for p in build_unet(SDXL_UNET, False, torch.float32).parameters())
    print(f"SDXL UNet parameters: {n_params:,} (published checkpoint: {SDXL_UNET_PARAMS:,})")
    assert n_params == SDXL_UNET_PARAMS, "the inline config does not rebuild SDXL's UNet"

    print(f"\nSDXL UNet, 1024x1024 px (latents 128x128), bf16 autocast. GiB = 2**30 bytes. Total = peak allocated "
          f"+ {CUDA_CONTEXT_GIB} GiB CUDA context.\n")
    print("| method | grad. ckpt | optimizer | UNet rows | trained params | weights | grads | optimizer states "
          "| activations | peak allocated (when) | of which transient | total |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    setups = [Setup(lora, gc, rows) for lora in (True, False) for gc in (True, False) for rows in (1, 2)]
    setups += [Setup(True, gc, 2, torch.float32) for gc in (True, False)]
    checks = []
    for setup in setups:
        for kind, m in replay_step(setup).items():
            print(f"| {setup.label} | {OPTIMIZERS[kind]} | {setup.rows} | {m.trained / 1e6:,.1f} M | {gib(m.weights)} "
                  f"| {gib(m.grads)} | {gib(m.optimizer)} | {gib(m.activations)} | {gib(m.peak)} ({m.peak_phase}) "
                  f"| {gib(m.transient)} | **{m.peak / GIB + CUDA_CONTEXT_GIB:.1f}** |", flush=True)
        checks.append((f"{setup.label} | {setup.rows}", m.saved, m.saved_fp32, m.activations))
    print(f"\nOps the emulated autocast cast in the forward: {', '.join(sorted(m.cast_ops))}")
    print("\nSaved for backward (autograd hooks, once per storage, weights left out) against all the forward "
          "leaves alive, GiB:")
    for label, saved, fp32, activations in checks:
        print(f"  {label:32s} saved {gib(saved):>6s} (fp32: {gib(fp32):>5s})   alive after the forward "
              f"{gib(activations):>6s}")

    parts = frozen_parts()
    print(f"\nOff the GPU during training. VAE weights in fp32: {gib(parts['vae_weights'])} GiB; its peak on top "
          f"of them, encoding one 1024x1024 image: {gib(parts['vae_encode'])} GiB, decoding one latent: "
          f"{gib(parts['vae_decode'])} GiB. Text encoders: {parts['text_params']:,} parameters "
          f"({gib(2 * parts['text_params'])} GiB in bf16). One UNet sampling step with guidance (2 rows, no grad) "
          f"on top of its weights: {gib(parts['unet_sample_step'])} GiB.")

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
