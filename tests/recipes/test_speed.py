"""The training step's speed contract: one host-device synchronisation per optimizer step, and
speed and memory options that leave the short loss curve where the plain path puts it."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from dreambooth.cli import main
from dreambooth.training.recorder import Recorder

FAST = [
    "--class-noun", "dog", "--num-class-images", "2", "--class-steps", "1", "--class-batch-size", "2",
    "--validation-every", "0", "--validation-images", "0", "--checkpoint-every", "0",
    "--logger", "none", "--learning-rate", "1e-3", "--no-save-pipeline",
]


CAN_COMPILE = bool(shutil.which("g++") or shutil.which("c++")) and Path(
    sysconfig.get_paths()["include"], "Python.h"
).is_file()


def train(model: Path, photos: Path, run_dir: Path, *extra: str) -> int:
    return main([
        "train", "--model", str(model), "--instance-dir", str(photos), "--run-dir", str(run_dir), *FAST,
        *extra,
    ])


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss/total"] for line in (run / "logs" / "base.jsonl").read_text().splitlines()]


class HostReads(TorchDispatchMode):
    """Counts the host's reads of device values (`.item()`, `bool()`, `float()`, `.tolist()`, `.numpy()`):
    on a GPU each one waits for every kernel queued before it.

    On CPU every tensor is a host tensor, so this tracks which ones stand for the device: a tensor is
    a host value when a CPU generator drew it or it was computed from host values only (the per-row
    draws and data order, made on the host by design); any other tensor lives on the device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.host = WeakTensorKeyDictionary()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.read(inputs[0])
        elif kwargs.get("generator") is not None or (inputs and all(t in self.host for t in inputs)):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[t] = True
        return out

    def read(self, tensor: torch.Tensor) -> None:
        if tensor not in self.host:
            self.count += 1


@pytest.mark.parametrize(
    "options", [[], ["--lora-rank", "4", "--train-text-encoder", "--gradient-accumulation-steps", "2"]],
    ids=["full", "lora+te+accumulation"],
)
def test_at_most_one_host_device_synchronisation_per_optimizer_step(
    options, tiny_sd: Path, photos: Path, tmp_path: Path, monkeypatch
) -> None:
    counter, at_step = HostReads(), []
    for name in ("tolist", "numpy"):  # these read CPU memory without dispatching an op
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, **k: counter.read(self) or _real(self, *a, **k)
        )
    log = Recorder.log
    monkeypatch.setattr(
        Recorder, "log", lambda self, step, values: at_step.append(counter.count) or log(self, step, values)
    )
    with counter:
        assert train(tiny_sd, photos, tmp_path / "run", "--max-steps", "6", *options) == 0
    # between the logs of consecutive steps
    per_step = [after - before for before, after in zip(at_step, at_step[1:])]
    assert len(per_step) == 5 and max(per_step) <= 1, per_step
    assert not (tmp_path / "run" / "samples").exists()  # --validation-images 0: no sampling at all


@pytest.mark.parametrize(("options", "rtol"), [
    (["--gradient-checkpointing"], 1e-5),
    (["--no-cache-latents"], 1e-5),
    (["--mixed-precision", "bf16"], 0.05),
    (["--use-8bit-adam"], 0.05),
    pytest.param(["--compile"], 1e-4, marks=pytest.mark.skipif(
        not CAN_COMPILE, reason="torch.compile on CPU builds C++: needs a C++ compiler and Python's headers"
    )),  # ~50 s the first time on 2 cores (inductor compiles C++), seconds once cached
], ids=["gradient-checkpointing", "no-cache-latents", "bf16", "8bit-adam", "compile"])
def test_speed_and_memory_options_keep_the_loss_curve_of_the_plain_path(
    options, rtol, tiny_sd: Path, photos: Path, tmp_path: Path
) -> None:
    assert train(tiny_sd, photos, tmp_path / "plain", "--max-steps", "4") == 0
    assert train(tiny_sd, photos, tmp_path / "option", "--max-steps", "4", *options) == 0
    plain, option = losses(tmp_path / "plain"), losses(tmp_path / "option")
    assert option == pytest.approx(plain, rel=rtol), (plain, option)
