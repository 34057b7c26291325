"""The loss and evaluation charts a run writes (`training.chart`, `training.recorder.plot_curves`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth.training.chart import COLOURS, MARGINS, Series, _y_ticks, line_chart
from dreambooth.training.recorder import plot_curves


def _plot_area(png: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    left, top, right, bottom = MARGINS
    return pixels[top + 2 : pixels.shape[0] - bottom - 2, left + 2 : pixels.shape[1] - right - 2]


def _has_colour(area: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return bool((np.abs(area - np.array(colour)).max(axis=-1) <= tolerance).any())


def test_each_logged_key_is_drawn_in_its_colour(tmp_path: Path) -> None:
    rows = [
        {"step": s, "loss/instance": 0.3 * math.exp(-s / 50), "loss/prior": 0.1 + 0.01 * (s % 3)}
        for s in range(1, 201)
    ]
    plot_curves(rows, tmp_path / "logs" / "loss-base.png", "stage base")

    area = _plot_area(tmp_path / "logs" / "loss-base.png")
    assert Image.open(tmp_path / "logs" / "loss-base.png").size == (700, 400)
    assert _has_colour(area, COLOURS[0]) and _has_colour(area, COLOURS[1])
    assert not _has_colour(area, COLOURS[2])  # no third series


def test_the_curve_falls_where_the_loss_falls(tmp_path: Path) -> None:
    rows = [{"step": s, "loss/instance": 10.0 ** (-s / 10)} for s in range(1, 31)]
    plot_curves(rows, tmp_path / "loss.png", "falling", keys=("loss/instance",))

    area = _plot_area(tmp_path / "loss.png")
    drawn = np.abs(area - np.array(COLOURS[0])).max(axis=-1) <= 12   # [h, w]
    columns = np.flatnonzero(drawn.any(axis=0))
    first_rows = np.flatnonzero(drawn[:, columns[0]])
    last_rows = np.flatnonzero(drawn[:, columns[-1]])
    assert first_rows.mean() < last_rows.mean()  # rows count downwards: high on the left, low on the right


def test_values_a_log_scale_cannot_show_are_left_out(tmp_path: Path) -> None:
    rows = [{"step": s, "loss/instance": v} for s, v in enumerate([0.0, -1.0, math.nan, math.inf, 0.5, 0.4])]
    plot_curves(rows, tmp_path / "loss.png", "stage base", keys=("loss/instance",))
    assert _has_colour(_plot_area(tmp_path / "loss.png"), COLOURS[0])

    line_chart([Series("zero", [0, 1], [0.0, 0.0])], tmp_path / "empty.png", "nothing", log_scale=True)
    assert not _has_colour(_plot_area(tmp_path / "empty.png"), COLOURS[0])


def test_log_ticks_are_round_values_inside_the_range() -> None:
    for lo, hi in [(0.03, 0.32), (1e-5, 3.0), (0.101, 0.13), (2e-9, 5e3)]:
        ticks = _y_ticks(math.log10(lo), math.log10(hi), log_scale=True)
        assert len(ticks) >= 2, (lo, hi, ticks)
        for position, label in ticks:
            assert math.log10(lo) <= position <= math.log10(hi)
            assert math.isclose(10**position, float(label), rel_tol=0.01)
            assert len(label) <= 6  # 0.05, 1e-05, 2000: short, round labels
