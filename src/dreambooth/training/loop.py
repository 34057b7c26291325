"""The training loop of one stage: read top to bottom to understand a run.

accelerate supplies devices, mixed precision, gradient accumulation and multi-process
gradient averaging; the step is `compute_loss`; state and batches are plain functions. The
same loop pretrains the pocket model and fine-tunes any model on a subject.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dreambooth.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from dreambooth.data.training_set import TrainingSet, sample_batch
from dreambooth.layout import StagePaths
from dreambooth.models._logs import without_warning
from dreambooth.models.lora import add_lora
from dreambooth.models.spec import Stage, frozen_modules, is_text_encoder, trainable_modules, with_modules
from dreambooth.seeding import derive_seed
from dreambooth.training.optim import build_lr_schedule, build_optimizer
from dreambooth.training.recorder import Recorder, plot_curves, step_metrics
from dreambooth.training.state import (
    CheckpointWriter,
    best_record,
    latest_checkpoint,
    load_best,
    load_latest,
    save_best,
)
from dreambooth.training.step import compute_loss

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

KeepBest = Callable[[dict[str, float], dict[str, float] | None, int], bool]
"""(validation scores now, scores of the best weights so far or None, step) -> whether the weights now become
the best."""


@dataclass(frozen=True)
class StagePlan:
    """Everything one stage's training needs besides the model and the data."""

    train: TrainConfig
    optim: OptimConfig
    lora: LoraConfig
    checkpoint: CheckpointConfig
    learning_rate: float
    """Learning rate of the denoiser."""
    text_encoder_learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    """The text encoders that train, by component name, with their learning rates (empty: all frozen)."""
    prior_weight: float = 1.0
    validate_every: tuple[int, ...] = ()
    """Call the validation function at multiples of each (and at the end); 0s are ignored."""
    keep_best: KeepBest | None = None
    """Decides which validated weights are the best so far; the best are exported. None: the last weights
    are."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the weights of the last good checkpoint are untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint of the last finished step was written before stopping."""


def train_stage(
    stage: Stage, data: TrainingSet, plan: StagePlan, paths: StagePaths, accelerator: Accelerator,
    validate: Callable[[int], dict[str, float] | None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> None:
    """Train `stage` for `plan.train.max_steps` optimizer steps, resuming from its latest checkpoint.

    `on_start` is called once the checkpoint (if any) has loaded, before anything is written.

    Raises:
        TrainingDiverged: on a non-finite loss (before the bad update is applied).
        TrainingInterrupted: on Ctrl-C, after saving a checkpoint.
    """
    train, device = plan.train, accelerator.device
    modules = _make_trainable(stage, plan, DTYPES[accelerator.mixed_precision])  # name -> module that trains
    for name, module in frozen_modules(stage, plan.text_encoder_learning_rates).items():
        # The step never runs a frozen part but a text encoder whose prompts are not cached (images
        # were encoded before training): the others leave the device; validation brings them back.
        offload = data.text_cache is not None or not is_text_encoder(name)
        _store_frozen(module, torch.device("cpu") if offload else device, DTYPES[accelerator.mixed_precision])
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = build_optimizer(_param_groups(modules, plan, stage.denoiser_name), plan.optim)
    schedule = build_lr_schedule(optimizer, plan.optim, train.max_steps)
    prepared = accelerator.prepare(*modules.values(), optimizer)
    wrapped, optimizer = dict(zip(modules, prepared[:-1])), prepared[-1]
    model = with_modules(stage, wrapped)                          # forward passes go through the wrappers
    ema = EMAModel(params, decay=train.ema_decay, foreach=True) if train.ema_decay else None

    # batches are then drawn without host-device copies
    data = data.to(device)
    dropout = _draws_dropout(modules)
    step = _resume(paths.checkpoints, modules, optimizer, schedule, ema, accelerator.scaler)
    if step > train.max_steps:
        logger.warning(
            "stage %s resumed at step %d, past its %d steps: nothing is left to train, and it ends with step "
            "%d's weights. An earlier step's weights: `dreambooth export RUN --checkpoint step-NNNNNN` of a "
            "checkpoint kept in %s", stage.name, step, train.max_steps, step, paths.checkpoints,
        )
    if on_start is not None:
        on_start()
    recorder = Recorder(paths.log, accelerator, resume_step=step)
    eval_recorder = Recorder(paths.eval_log, accelerator, resume_step=step)
    bar = tqdm(
        total=train.max_steps, initial=step, desc=f"train {stage.name}",
        disable=not accelerator.is_main_process,
    )
    writer = CheckpointWriter(background=device.type == "cuda")
    # closing: every checkpoint started is complete on exit, and the logs are closed
    with (
        _StopOnSigint() as stop, contextlib.closing(writer), contextlib.closing(recorder),
        contextlib.closing(eval_recorder),
    ):
        while step < train.max_steps:
            micro_losses, micro_terms = [], []
            for micro in range(train.gradient_accumulation_steps):
                batch = sample_batch(
                    data, stage.tokenize, step=step, micro=micro,
                    accumulation=train.gradient_accumulation_steps, rank=accelerator.process_index,
                    world=accelerator.num_processes, batch_size=train.batch_size, seed=train.seed,
                    caption_dropout=train.caption_dropout,
                ).to(device)
                draws = (
                    _dropout_rng(train.seed, step, micro, accelerator.process_index) if dropout
                    else contextlib.nullcontext()
                )
                with accelerator.accumulate(*wrapped.values()), draws:
                    loss, terms = compute_loss(model, batch, plan.prior_weight)
                    accelerator.backward(loss)
                    micro_losses.append(loss.detach())
                    micro_terms.append(terms)
                    if accelerator.sync_gradients:
                        # The step's one host-device synchronisation: its metrics, read before the update.
                        metrics = step_metrics(micro_losses, micro_terms, accelerator)
                        _check_finite(metrics, step, paths.checkpoints, writer)
                        if plan.optim.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, plan.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if ema is not None:
                ema.step(params)
            step += 1

            if accelerator.is_main_process:
                metrics["lr"] = schedule.get_last_lr()[0]
                recorder.log(step, metrics)
                # redrawn by update() at most every 0.1 s, not on every step
                bar.set_postfix(loss=f"{metrics['loss/total']:.4f}", refresh=False)
                bar.update()
            done = step == train.max_steps
            if done or stop.requested or _due(step, plan.checkpoint.every_n_steps):
                _save(
                    writer, paths, step, modules, optimizer, schedule, ema, plan.checkpoint.keep_last,
                    accelerator, recorder, stage.name,
                )
            if stop.requested:
                raise TrainingInterrupted(
                    f"interrupted at step {step}; checkpoint saved in {paths.checkpoints}: rerun with "
                    "--resume"
                )
            if validate is not None and (done or any(_due(step, every) for every in plan.validate_every)):
                _with_ema(
                    ema, params,
                    functools.partial(
                        _validate, validate, step, plan, paths, modules, eval_recorder, accelerator
                    ),
                )
    bar.close()
    if ema is not None:
        ema.copy_to(params)                                       # exports use the averaged weights
    if plan.keep_best is not None and best_record(paths.checkpoints) is not None:
        record = load_best(paths.checkpoints, modules)
        logger.info(
            "stage %s ends with its best checkpoint: step %d (%s)", stage.name, record["step"],
            record["scores"],
        )


def _make_trainable(stage: Stage, plan: StagePlan, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Full fine-tuning or LoRA adapters; gradient checkpointing when asked. Returns the modules that train.

    Under mixed precision a LoRA run stores the frozen base weights in the autocast dtype and
    only the adapters in fp32 (their master copy); full fine-tuning keeps fp32 master weights.
    """
    modules = trainable_modules(stage, plan.text_encoder_learning_rates)
    if plan.lora.rank is not None:
        for module in modules.values():
            # quantised weights stay as they are
            if dtype != torch.float32 and getattr(module, "hf_quantizer", None) is None:
                _cast(module, dtype)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        # the adapters' random init follows the run's seed, nothing else
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(plan.train.seed, "lora", stage.name))
            add_lora(stage, plan.lora, modules)
        for param in (p for m in modules.values() for p in m.parameters() if p.requires_grad):
            param.data = param.data.float()
    else:
        for module in modules.values():
            module.requires_grad_(True)
    if plan.train.gradient_checkpointing:
        stage.denoiser.enable_gradient_checkpointing()
        for name in plan.text_encoder_learning_rates:
            stage.text_encoders[name].gradient_checkpointing_enable()
    if plan.train.compile:
        _compile_blocks(stage.denoiser)
    for module in modules.values():
        module.train()
    return modules


def _compile_blocks(denoiser: torch.nn.Module) -> None:
    """Regional compilation: each repeated block (a transformer layer) is compiled once and reused,
    a fraction of the compile time of the whole model for the same step time."""
    if getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks()
    else:  # a model that does not name its repeated blocks (SD3's transformer): each of its blocks
        for block in getattr(denoiser, "transformer_blocks", [denoiser]):
            block.compile()


def _store_frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module to the device, in the autocast dtype unless it asks to be upcast (a VAE
    whose config says `force_upcast`, e.g. SDXL's, which overflows in fp16)."""
    module.requires_grad_(False).to(device)
    if dtype != torch.float32 and not getattr(getattr(module, "config", None), "force_upcast", False):
        _cast(module, dtype)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype=dtype)`, without the warning diffusers models print on every such cast (that
    modules meant to stay in fp32 may be cast) when the model names no such module."""
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype=dtype)
        return
    with without_warning("diffusers.models.modeling_utils", "There are modules in"):
        module.to(dtype=dtype)


def _param_groups(modules: dict[str, torch.nn.Module], plan: StagePlan, denoiser_name: str) -> list[dict]:
    rates = {denoiser_name: plan.learning_rate, **plan.text_encoder_learning_rates}
    return [
        {"params": [p for p in m.parameters() if p.requires_grad], "lr": rates[name]}
        for name, m in modules.items()
    ]


def _resume(root: Path, modules, optimizer, schedule, ema, scaler) -> int:
    loaded = load_latest(root, modules)
    if loaded is None:
        return 0
    checkpoint, step, state = loaded
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["lr_schedule"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("grad_scaler") is not None:
        scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale it had reached
    logger.info("resumed from %s (step %d)", checkpoint, step)
    return step


def _save(
    writer: CheckpointWriter, paths: StagePaths, step, modules, optimizer, schedule, ema, keep_last,
    accelerator, recorder, name,
) -> None:
    """Checkpoint the step (the files and the loss plot are written in the background)."""
    if accelerator.is_main_process:
        state = {
            "optimizer": optimizer.state_dict(), "lr_schedule": schedule.state_dict(),
            "ema": ema.state_dict() if ema else None,
            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        unwrapped = {k: accelerator.unwrap_model(m) for k, m in modules.items()}
        loss = recorder.rows[-1].get("loss/total") if recorder.rows else None
        rows = list(recorder.rows)
        plot = functools.partial(plot_curves, rows, paths.loss_plot, f"stage {name}")
        writer.save(paths.checkpoints, step, unwrapped, state, {"loss": loss}, keep_last, then=plot)
    accelerator.wait_for_everyone()


def _validate(
    validate, step: int, plan: StagePlan, paths: StagePaths, modules, recorder: Recorder, accelerator
) -> None:
    """Sample/score now; log the scores; keep the weights if they are the best that pass the guard."""
    scores = validate(step) if accelerator.is_main_process else None
    if scores:
        recorder.log(step, scores)
        recorder.plot(paths.eval_plot, "evaluation during training", keys=tuple(scores), log_scale=False)
        best = best_record(paths.checkpoints)
        if plan.keep_best is not None and plan.keep_best(scores, best["scores"] if best else None, step):
            save_best(
                paths.checkpoints, step, {k: accelerator.unwrap_model(m) for k, m in modules.items()}, scores
            )
    accelerator.wait_for_everyone()


def _check_finite(metrics: dict[str, float], step: int, checkpoints: Path, writer: CheckpointWriter) -> None:
    """Raise before the update when any process's loss of this step is NaN or infinite."""
    if math.isfinite(metrics["loss/total"]):  # the mean over processes: non-finite if any process's loss is
        return
    writer.wait()
    last = latest_checkpoint(checkpoints)
    where = (
        f"the last good checkpoint is {last} (continue from it with --resume)" if last
        else "no checkpoint was written yet"
    )
    raise TrainingDiverged(
        f"loss became {metrics['loss/total']} at step {step + 1}; the update was not applied and {where}. "
        "Try a lower learning rate, bf16 instead of fp16, or a smaller max_grad_norm"
    )


def _draws_dropout(modules: dict[str, torch.nn.Module]) -> bool:
    """Whether a module that trains drops activations (nn.Dropout, or attention dropout as a rate)."""
    return any(
        (isinstance(m, torch.nn.Dropout) and m.p > 0)
        or (isinstance(vars(m).get("dropout"), float) and m.dropout > 0) for module in modules.values()
        for m in module.modules()
    )


@contextlib.contextmanager
def _dropout_rng(seed: int, step: int, micro: int, rank: int):
    """Seed the global RNG that dropout draws from (a trained text encoder's, --lora-dropout) by the
    step, so that a resumed run draws the masks an uninterrupted one does; the caller's RNG is restored."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, "dropout", step, micro, rank))
        yield


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _with_ema(ema: EMAModel | None, params, fn: Callable[[], None]) -> None:
    """Run `fn` with the EMA weights in place (what would be exported), then restore the raw ones."""
    if ema is None:
        return fn()
    ema.store(params)
    ema.copy_to(params)
    try:
        fn()
    finally:
        ema.restore(params)


class _StopOnSigint:
    """First Ctrl-C asks the loop to checkpoint and stop at the end of the step; a second one aborts."""

    def __enter__(self) -> _StopOnSigint:
        self.requested = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: saving a checkpoint at the end of this step (press again to abort)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
