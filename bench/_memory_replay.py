"""Replaying a training step on the `meta` device to compute its peak GPU memory without a GPU.

Shared by `sdxl_memory.py` and `flux_memory.py`: an emulation of CUDA bf16 autocast and of the
fused attention kernels, a byte-by-byte follower of every storage the step allocates, and the
replay of one steady-state step (forward, fp32 loss, backward, clipping, optimizer step) for
AdamW and 8-bit AdamW. The method and its checks are in docs/sdxl-memory.md.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

GIB, MIB = 2**30, 2**20
CUDA_CONTEXT_GIB = 0.5        # CUDA context + cuBLAS/cuDNN handles: outside max_memory_allocated
OPTIMIZERS = {"adamw8bit": "8-bit AdamW", "adamw": "AdamW"}

# The ops CUDA autocast casts, by name (torch.amp docs, "CUDA Ops that can autocast to ...";
# rms_norm and logsumexp from the fp32 list torch's own CUDA autocast tests check,
# torch/testing/_internal/autocast_test_lists.py).
AUTOCAST_LOWER = frozenset((
    "__matmul__ addbmm addmm addmv addr baddbmm bmm chain_matmul multi_dot conv1d conv2d conv3d "
    "conv_transpose1d "
    "conv_transpose2d conv_transpose3d linear matmul mm mv prelu einsum scaled_dot_product_attention"
).split())
AUTOCAST_FP32 = frozenset((
    "__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh "
    "cosine_embedding_loss "
    "cdist cosine_similarity cross_entropy cumprod cumsum dist erfinv exp expm1 group_norm "
    "hinge_embedding_loss "
    "kl_div l1_loss layer_norm log log_softmax log10 log1p log2 logsumexp margin_ranking_loss mse_loss "
    "multilabel_margin_loss multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow prod "
    "reciprocal rms_norm rsqrt sinh smooth_l1_loss soft_margin_loss softmax softmin softplus sum renorm tan "
    "triplet_margin_loss"
).split())

# CPU autocast's policy for the ops a UNet calls (probed: it leaves group_norm and layer_norm alone).
CPU_AUTOCAST_LOWER = frozenset((
    "__matmul__ addbmm addmm baddbmm bmm mm conv1d conv2d conv3d conv_transpose1d conv_transpose2d "
    "conv_transpose3d linear matmul prelu scaled_dot_product_attention"
).split())
CPU_AUTOCAST_FP32 = frozenset(
    "mse_loss l1_loss nll_loss cross_entropy kl_div binary_cross_entropy_with_logits".split()
)


class EmulatedAutocast(TorchFunctionMode):
    """CUDA `torch.autocast(dtype=torch.bfloat16)` for tensors on any device (here: meta).

    A CPU build has no CUDA autocast, and CPU autocast has another op policy (it leaves group_norm
    and layer_norm in bf16), so the casts are made here, by op name, at the functional level where
    autograd records them: the floating inputs of the lower-precision ops become bf16, those of the
    fp32 ops fp32, other ops run in their inputs' dtypes. As in autocast, the bf16 copy of an fp32
    leaf that requires grad (a trained weight) is made once and kept until the context exits;
    other tensors are cast at each use. `scaled_dot_product_attention` runs as a fused kernel (see
    `_fused_attention`), which saves q, k, v, the output and the log-sum-exp for backward (on meta
    it would otherwise take the math path, which saves the whole attention matrix). While the
    context is active, `torch.is_autocast_enabled()` answers True, as under real CUDA autocast
    (peft's LoRA layers over quantised bases skip their own input cast then).

    Args:
        dtype: the autocast dtype, or None for no casts (the fused attention only).
        attention: "cuda" for the CUDA kernels, "cpu" for the one CPU picks in
            `scaled_dot_product_attention` (same saved tensors, without the dropout RNG state).
            It also selects the op policy: CUDA autocast's, or CPU autocast's for the sanity check.
    """

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, attention: str = "cuda"):
        super().__init__()
        self.dtype, self.attention = dtype, attention
        self.lower, self.fp32 = (
            (AUTOCAST_LOWER, AUTOCAST_FP32) if attention == "cuda"
            else (CPU_AUTOCAST_LOWER, CPU_AUTOCAST_FP32)
        )
        self.weight_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cast_ops: set[str] = set()
        self._flag: tuple[bool, torch.dtype] | None = None

    def __enter__(self):
        if self.dtype is not None and self.attention == "cuda":
            # Only the thread-local flag: meta tensors carry no CUDA autocast dispatch key.
            self._flag = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        self.weight_copies.clear()
        if self._flag is not None:
            torch.set_autocast_enabled("cuda", self._flag[0])
            torch.set_autocast_dtype("cuda", self._flag[1])
            self._flag = None
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
            return _fused_attention(self.attention, *args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention(kernel, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """The fused kernel PyTorch picks on a GPU: flash attention, or, with an additive mask (T5's
    position bias), the memory-efficient kernel, which saves the mask as well."""
    assert not enable_gqa, "no model here groups its query heads"
    q, k, v = query, key, value
    if attn_mask is not None:
        assert kernel == "cuda", "the CPU sanity check has no attention mask"
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        bias = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, grad, dropout_p, is_causal, scale=scale)[0]
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, scale=scale
        )[0]
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

    @property
    def peak(self) -> int:
        """The most bytes alive at once, over all phases."""
        return max(peak for peak, _ in self.peaks.values())

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


class MetaKernelCache(TorchDispatchMode):
    """Answers a meta kernel from memory when the same op met inputs of the same metadata before.

    A meta kernel computes only metadata, and many run as Python references (a broadcast `mul` takes
    about 0.4 ms), while a transformer repeats the same ops on the same shapes in every block. For an
    aten op that returns only new tensors (no views, no in-place or out= writes), the outputs'
    storage sizes, shapes, strides and dtypes are recorded per (op, argument metadata) and later made
    with `torch.empty(...).as_strided(...)`, which `LiveBytes` sees as the same allocations.
    """

    def __init__(self):
        super().__init__()
        self.memo: dict[tuple, tuple[list, object]] = {}
        self._fresh: dict[object, bool] = {}

    def _returns_new_tensors(self, func) -> bool:
        if func not in self._fresh:
            schema = func._schema
            self._fresh[func] = (
                func.namespace == "aten" and not schema.is_mutable and len(schema.returns) > 0
                and all(r.alias_info is None and str(r.type) in ("Tensor", "Tensor?") for r in schema.returns)
                and all(a.alias_info is None for a in schema.arguments)
            )
        return self._fresh[func]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._returns_new_tensors(func):
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        key = [func, spec]
        for a in flat:
            if isinstance(a, torch.Tensor):
                if a.device.type != "meta":
                    return func(*args, **kwargs)
                key.append((tuple(a.shape), a.stride(), a.storage_offset(), a.dtype))
            else:
                key.append((type(a), a))
        key = tuple(key)
        try:
            hit = self.memo.get(key)
        except TypeError:                       # an unhashable argument
            return func(*args, **kwargs)
        if hit is not None:
            outputs, out_spec = hit
            return tree_unflatten(
                [
                    None if o is None else torch.empty(o[0], dtype=o[1], device="meta").as_strided(*o[2:])
                    for o in outputs
                ],
                out_spec,
            )
        out = func(*args, **kwargs)
        flat_out, out_spec = tree_flatten(out)
        outputs, storages = [], set()
        for o in flat_out:
            if o is None:
                outputs.append(None)
                continue
            if not isinstance(o, torch.Tensor) or o.device.type != "meta":
                return out
            storage = o.untyped_storage()
            if storage._cdata in storages or storage.nbytes() % o.element_size():
                return out                      # outputs sharing a storage: not recorded
            storages.add(storage._cdata)
            outputs.append((
                storage.nbytes() // o.element_size(), o.dtype, tuple(o.shape), o.stride(), o.storage_offset(),
            ))
        self.memo[key] = (outputs, out_spec)
        return out


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """Sums the bytes autograd saves for backward, once per storage, leaving out the baseline (weights).

    Storages are told apart by `tracker`'s ids (an address can be reused once freed). Blind inside
    checkpointed blocks, where checkpoint's own hooks take over, and to what a custom autograd
    Function keeps on its `ctx` instead of saving it (bitsandbytes' 8-bit matmul keeps its input so).
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


def replay_step(
    model: torch.nn.Module, make_batch: Callable[[], object], loss_of: Callable, autocast: EmulatedAutocast,
    block: int = 512, frozen_state: Iterable[torch.Tensor] = (),
    kernels: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, StepMemory]:
    """One steady-state training step of `model` on meta tensors, followed byte by byte, for each optimizer.

    Steady state: the optimizer states exist and the gradients start as None (`zero_grad(set_to_none=True)`).
    The forward and backward are the same for both optimizers; 8-bit AdamW updates each parameter
    in place, so only AdamW's step allocates (its foreach implementation).

    Args:
        model: on meta, its trained parameters in fp32 and marked `requires_grad`.
        make_batch: the step's inputs, made on meta once the following starts; alive until the backward ends.
        loss_of: `loss_of(model, batch, autocast)`, the scalar loss.
        autocast: the forward's emulated autocast; the ops it cast are reported.
        block: allocation granularity in bytes.
        frozen_state: tensors besides the parameters that hold weights (quantisation scales): baseline, and
            counted with the weights.
        kernels: a context entered inside the following, for the buffers of kernels whose meta version
            allocates only outputs.
    """
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    optimizers = {kind: build_optimizer(trained, kind) for kind in OPTIMIZERS}
    states = {kind: state_tensors(optimizer, "meta") for kind, optimizer in optimizers.items()}
    frozen_state = list(frozen_state)
    tracker = LiveBytes("meta", block)
    tracker.ignore_existing([*params, *frozen_state, *itertools.chain(*states.values())])
    saved = SavedForBackward(tracker)
    with tracker, kernels():
        batch = make_batch()
        with saved:
            loss = loss_of(model, batch, autocast)
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

    weights = storage_bytes([*params, *frozen_state], block)
    results = {}
    for kind in OPTIMIZERS:
        phases = ("forward", "backward", "clip") + (("AdamW step",) if kind == "adamw" else ())
        phase = max(phases, key=lambda p: tracker.peaks[p][0])
        peak, event = tracker.peaks[phase]
        at_peak = tracker.live_uids(event)
        optimizer = storage_bytes(states[kind], block)
        results[kind] = StepMemory(
            trained=sum(p.numel() for p in trained), weights=weights, grads=tracker.bytes_of(grads),
            optimizer=optimizer, saved=saved.bytes, saved_fp32=saved.fp32_bytes,
            activations=tracker.bytes_of(after_forward), peak=weights + optimizer + peak,
            peak_phase={"AdamW step": "step", "clip": "step"}.get(phase, phase),
            peak_grads=tracker.bytes_of(at_peak & grads),
            peak_activations=tracker.bytes_of(at_peak & after_forward),
            forward_backward_peak=max(tracker.peaks["forward"][0], tracker.peaks["backward"][0]),
            cast_ops=frozenset(autocast.cast_ops),
        )
    return results


def peak_of(existing: Iterable[torch.Tensor], run: Callable[[], object],
            kernels: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> int:
    """The most bytes `run()` has alive at once on meta, without grad, on top of `existing` (its weights)."""
    tracker = LiveBytes("meta")
    tracker.ignore_existing(list(existing))
    with tracker, kernels(), torch.no_grad():
        run()
    return tracker.peak


def cpu_allocation_totals(prof) -> tuple[list[int], list[int]]:
    """The sizes of every CPU allocation a `torch.profiler` session recorded (frees negative), in time order,
    and their running totals: the bytes that session held after each."""
    from torch._C._profiler import _EventType

    events = []

    def walk(event) -> None:
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            events.append((event.start_time_ns, event.typed[1].alloc_size))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    sizes = [size for _, size in sorted(events)]
    return sizes, list(itertools.accumulate(sizes))


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"
