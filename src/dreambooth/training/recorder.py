"""Training metrics: one JSON line per step, TensorBoard through accelerate, and a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TextIO

import torch

from dreambooth.files import atomic_write_text
from dreambooth.training.chart import Series, line_chart

logger = logging.getLogger(__name__)


class Recorder:
    """Appends step metrics to `path`; on resume, drops lines past the checkpoint it resumed from.

    Each line carries `elapsed_s`, the stage's wall-clock seconds so far, summed over resumes. The file
    stays open between steps (`close` ends it); every line is flushed as it is written.
    """

    def __init__(self, path: Path, accelerator, resume_step: int = 0) -> None:
        self.path, self.accelerator = path, accelerator
        self.rows: list[dict] = []
        if path.is_file():
            self.rows = [r for r in read_rows(path) if r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic() - (self.rows[-1].get("elapsed_s", 0.0) if self.rows else 0.0)
        self._file: TextIO | None = None

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {
            "step": step, **{k: round(float(v), 6) for k, v in values.items()},
            "elapsed_s": round(time.monotonic() - self._started, 3),  # ms: per-step times can be read back
        }
        self.rows.append(row)
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.accelerator.log(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def plot(
        self, png: Path, title: str, keys: tuple[str, ...] = ("loss/instance", "loss/prior"),
        log_scale: bool = True,
    ) -> None:
        plot_curves(self.rows, png, title, keys, log_scale)


def plot_curves(
    rows: list[dict], png: Path, title: str, keys: tuple[str, ...] = ("loss/instance", "loss/prior"),
    log_scale: bool = True,
) -> None:
    """Curves of `keys` over steps: raw and smoothed when there are many points, markers when few."""
    series = []
    for colour, key in enumerate(keys):
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        if len(values) > 20:
            series += [
                Series(None, steps, values, colour, faint=True), Series(key, steps, _smooth(values), colour)
            ]
        elif values:
            series.append(Series(key, steps, values, colour, markers=True))
    line_chart(series, png, title, log_scale=log_scale)


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL log; a line that does not parse (torn by a crash or power loss) is dropped with a
    warning."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif line.strip():
            logger.warning("%s line %d is damaged (an interrupted write?); dropping it", path, number)
    return rows


def step_metrics(
    micro_losses: list[torch.Tensor], micro_terms: list[dict[str, torch.Tensor]], accelerator
) -> dict[str, float]:
    """Scalars of one optimizer step over its micro-batches and processes (the global batch): the total
    and per-term losses, and the instance loss by noise-level quartile (`loss/t0` the least noisy quarter
    of the range, `loss/t3` the noisiest). Computed on the device and read by the host in one copy."""
    loss = accelerator.reduce(torch.stack(micro_losses).mean(), "mean")
    terms = {key: torch.cat([t[key] for t in micro_terms]) for key in micro_terms[0]}
    terms = {key: accelerator.gather(value) if value.numel() else value for key, value in terms.items()}
    instance = terms["loss/instance"].float()
    quartile = (terms["level/instance"].float() * 4).floor().clamp(0, 3).long()
    sums = torch.zeros(4, device=instance.device).index_add_(0, quartile, instance)
    counts = torch.bincount(quartile, minlength=4).float()
    means = {
        key: terms[key].float().mean().reshape(1) for key in ("loss/instance", "loss/prior")
        if terms[key].numel()
    }
    values = torch.cat([loss.float().reshape(1), *means.values(), sums, counts]).tolist()
    out = dict(zip(["loss/total", *means], values))
    quartile_sums, quartile_counts = values[-8:-4], values[-4:]
    out |= {
        f"loss/t{q}": total / count for q, (total, count) in enumerate(zip(quartile_sums, quartile_counts))
        if count
    }
    return out


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, started at the first value."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else weight * out[-1] + (1 - weight) * v)
    return out
