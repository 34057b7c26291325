"""Resumable checkpoints: trainable weights, optimizer, schedule, EMA and the step, written atomically.

Layout: `<checkpoints>/step-000200/` holds `trainable.safetensors`, `optimizer.pt` and
`progress.json` (written last: a checkpoint without it is incomplete), and a `latest` file
names the newest complete one. A checkpoint is assembled in a hidden temporary folder and
renamed into place, and `latest` is replaced atomically, so a process killed at any moment
never leaves a half-written checkpoint as "latest".
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_map

from dreambooth.files import atomic_write_text, read_json, with_usual_permissions, write_json

logger = logging.getLogger(__name__)

STEP_KEY = "step"
LATEST_FILE = "latest"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The parameters that train (full weights, or only LoRA adapters), keyed '<module>.<param>'."""
    return {
        f"{name}.{param_name}": param
        for name, module in modules.items()
        for param_name, param in module.named_parameters()
        if param.requires_grad
    }


def save_checkpoint(
    root: Path, step: int, modules: dict[str, nn.Module], training_state: dict, extra: dict, keep_last: int
) -> Path:
    """Write checkpoint `step` under `root`, point `latest` at it, and prune to `keep_last`.

    Args:
        modules: the trainable modules, unwrapped.
        training_state: state dicts of the optimizer, schedule and EMA, saved with torch.save.
        extra: JSON-able facts recorded in progress.json (e.g. the loss).
    """
    return _write_checkpoint(root, step, *_host_copy(modules, training_state), extra, keep_last)


class CheckpointWriter:
    """Saves checkpoints in a background thread: training on a GPU waits only for the copy to host memory.

    One checkpoint is written at a time, in order; `wait()` returns once the last one is complete
    (and re-raises its error, e.g. a full disk). `background=False` writes in `save` itself (on a
    CPU the writer would compete with training for the same cores).
    """

    def __init__(self, background: bool = True) -> None:
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        )
        self._pending: Future | None = None

    def save(
        self, root: Path, step: int, modules: dict[str, nn.Module], training_state: dict, extra: dict,
        keep_last: int, then: Callable[[], None] | None = None,
    ) -> None:
        """`save_checkpoint` with the tensors copied now and the files written in the background, then
        `then()`."""
        weights, state = _host_copy(modules, training_state)
        self.wait()

        def write() -> None:
            _write_checkpoint(root, step, weights, state, extra, keep_last)
            if then is not None:
                then()

        if self._pool is None:
            return write()
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()


def _host_copy(modules: dict[str, nn.Module], training_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable weights and the training state as host copies that later steps cannot change."""
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trainable_state(modules).items()}
    state = tree_map(
        lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v),
        training_state,
    )
    return weights, state


def _write_checkpoint(
    root: Path, step: int, weights: dict[str, torch.Tensor], training_state: dict, extra: dict, keep_last: int
) -> Path:
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / TRAINABLE_FILE)
    torch.save(training_state, tmp / OPTIMIZER_FILE)
    write_json(tmp / PROGRESS_FILE, {STEP_KEY: step, **extra})
    with_usual_permissions(tmp)
    if final.exists():  # the same step saved again (e.g. on interrupt right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    _prune(root, keep_last)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (files not checked; see `load_latest`), or None."""
    candidates = _candidates(root)
    return candidates[0] if candidates else None


def _candidates(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, newest first: the one `latest` names, then by step."""
    complete = sorted((p for p in root.glob("step-*") if (p / PROGRESS_FILE).is_file()), reverse=True)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text(errors="replace").strip()
        if named in complete:
            return [named, *(p for p in complete if p != named)]
        logger.warning(
            "%s points at a missing or incomplete checkpoint; using the newest complete one", pointer
        )
    return complete


class DamagedCheckpoint(ValueError):
    """A checkpoint's files are missing, truncated or unreadable (a crash or a full disk while writing)."""


def load_latest(root: Path, modules: dict[str, nn.Module]) -> tuple[Path, int, dict] | None:
    """Load the newest intact checkpoint under `root` into `modules`: (its path, step, training state), or
    None.

    Damaged checkpoints are skipped with a warning naming each and why, falling back to older ones.

    Raises:
        ValueError: if checkpoints exist but none is intact, or they belong to another model or method.
    """
    candidates = _candidates(root)
    skipped = []
    for path in candidates:
        try:
            step, state = load_checkpoint(path, modules)
        except DamagedCheckpoint as error:
            logger.warning("skipping checkpoint %s: %s", path.name, error)
            skipped.append(str(error))
            continue
        if skipped:
            logger.warning(
                "resuming from %s, the newest intact checkpoint (skipped: %s)", path.name, "; ".join(skipped)
            )
        return path, step, state
    if candidates:
        raise ValueError(f"no intact checkpoint in {str(root)!r} to resume from ({'; '.join(skipped)}): "
                         "pass --overwrite to start the run over, or --run-dir for a new folder")
    return None


def load_checkpoint(path: Path, modules: dict[str, nn.Module]) -> tuple[int, dict]:
    """Load trainable weights into `modules`; return the step and the saved training state.

    Every file is read and checked before any weight is copied, so a failure leaves `modules` as they were.

    Raises:
        DamagedCheckpoint: if a file is missing, truncated or unreadable.
        ValueError: if the checkpoint's parameters do not match the model's (another model or method).
    """
    weights, training_state, step = _read_checkpoint(path)
    params = trainable_state(modules)
    if set(weights) != set(params):
        missing, unexpected = sorted(set(params) - set(weights))[:3], sorted(set(weights) - set(params))[:3]
        raise ValueError(
            f"checkpoint {str(path)!r} does not match this model's trainable parameters "
            f"(missing e.g. {missing}, unexpected e.g. {unexpected}): was it made with another model, "
            "LoRA setting or --train-text-encoder? Start a new run folder or pass --overwrite"
        )
    if reshaped := [k for k in weights if weights[k].shape != params[k].shape]:
        key = reshaped[0]
        raise ValueError(
            f"checkpoint {str(path)!r} belongs to a model of another shape ({key} is "
            f"{list(weights[key].shape)} there, "
            f"{list(params[key].shape)} in this model; {len(reshaped)} tensors differ): resume with the "
            "model and "
            "LoRA rank the run was started with (its config.resolved.toml), or start a new run folder"
        )
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value)
    return step, training_state


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, int]:
    try:
        step = int(read_json(path / PROGRESS_FILE)[STEP_KEY])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"{str(path / PROGRESS_FILE)!r} is unreadable ({error})") from error
    try:
        weights = load_file(path / TRAINABLE_FILE)
    except Exception as error:  # safetensors raises its own error type for a truncated or corrupt file
        raise DamagedCheckpoint(f"{str(path / TRAINABLE_FILE)!r} is unreadable ({error})") from error
    try:
        training_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
    except Exception as error:  # EOFError, UnpicklingError, RuntimeError from zip: all mean a damaged file
        raise DamagedCheckpoint(
            f"{str(path / OPTIMIZER_FILE)!r} is unreadable ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(training_state, dict):
        raise DamagedCheckpoint(f"{str(path / OPTIMIZER_FILE)!r} holds no training state")
    return weights, training_state, step


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if (p / PROGRESS_FILE).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


BEST_DIR = "best"
BEST_FILE = "best.json"


def save_best(root: Path, step: int, modules: dict[str, nn.Module], scores: dict) -> None:
    """Keep the trainable weights of the best evaluation so far in `<root>/best/` (atomically)."""
    tmp, final = root / ".tmp-best", root / BEST_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trainable_state(modules).items()},
        tmp / TRAINABLE_FILE,
    )
    write_json(tmp / BEST_FILE, {STEP_KEY: step, "scores": scores})
    with_usual_permissions(tmp)
    old = root / ".old-best"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def best_record(root: Path) -> dict | None:
    """The step and scores of the kept best checkpoint, or None."""
    path = root / BEST_DIR / BEST_FILE
    return read_json(path) if path.is_file() else None


def load_best(root: Path, modules: dict[str, nn.Module]) -> dict:
    """Load the best checkpoint's weights into `modules`; return its record."""
    weights = load_file(root / BEST_DIR / TRAINABLE_FILE)
    params = trainable_state(modules)
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value)
    return read_json(root / BEST_DIR / BEST_FILE)
