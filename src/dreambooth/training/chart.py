"""Line charts of logged metrics as PNG images (a run's loss and evaluation curves), drawn with Pillow.

A chart is a few lines, ticks and labels: Pillow draws one in milliseconds, where a plotting library
would add its import time and tens of megabytes to every training process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dreambooth.files import atomic_write_bytes

COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127),
)
SCALE = 2
"""Drawn at twice the size and downsampled: Pillow's lines are not anti-aliased."""
MARGINS = (70, 34, 20, 44)
"""left, top, right, bottom (px): room for the y tick labels, the title, and the x ticks and label."""


@dataclass(frozen=True)
class Series:
    """One curve: its legend label (None: not in the legend), x values (steps), y values and colour (an
    index into COLOURS); `faint` draws it light and thin (the raw values behind a smoothed curve of the
    same colour), `markers` marks each point."""

    label: str | None
    steps: Sequence[float]
    values: Sequence[float]
    colour: int = 0
    faint: bool = False
    markers: bool = False


def line_chart(
    series: Sequence[Series], png: Path, title: str, *, log_scale: bool = False, xlabel: str = "step",
    size: tuple[int, int] = (700, 400),
) -> None:
    """Write `series` as a PNG line chart; points that are not finite (or not positive on a log scale) are
    left out."""
    points = [_visible(s, log_scale) for s in series]
    xs = [x for ps in points for x, _ in ps]
    ys = [y for ps in points for _, y in ps]
    width, height = size
    image = Image.new("RGB", (width * SCALE, height * SCALE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11 * SCALE)
    left, top, right, bottom = (m * SCALE for m in MARGINS)
    box = (left, top, width * SCALE - right, height * SCALE - bottom)
    _centred(draw, title, (box[0] + box[2]) / 2, top / 2, ImageFont.load_default(size=13 * SCALE))
    _centred(draw, xlabel, (box[0] + box[2]) / 2, height * SCALE - bottom / 3, font)
    if xs:
        x_range, y_range = _padded(min(xs), max(xs), 0.02), _padded(min(ys), max(ys), 0.05)
        to_px = _Axes(box, x_range, y_range)
        for tick in _ticks(*x_range):
            x = to_px.x(tick)
            draw.line([(x, box[1]), (x, box[3])], fill=(232, 232, 232), width=SCALE)
            _centred(draw, f"{tick:g}", x, box[3] + 9 * SCALE, font)
        for tick, label in _y_ticks(*y_range, log_scale):
            y = to_px.y(tick)
            draw.line([(box[0], y), (box[2], y)], fill=(232, 232, 232), width=SCALE)
            draw.text((box[0] - 6 * SCALE, y), label, fill="black", font=font, anchor="rm")
        for s, ps in zip(series, points):
            _draw_series(draw, s, [(to_px.x(x), to_px.y(y)) for x, y in ps])
        _legend(draw, [s for s in series if s.label], box, font)
    else:
        _centred(draw, "no values yet", (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, font)
    draw.rectangle(box, outline=(120, 120, 120), width=SCALE)
    encoded = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(encoded, format="PNG")
    atomic_write_bytes(png, encoded.getvalue())


@dataclass(frozen=True)
class _Axes:
    box: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def x(self, value: float) -> float:
        (lo, hi), (left, _, right, _) = self.x_range, self.box
        return left + (value - lo) / (hi - lo) * (right - left)

    def y(self, value: float) -> float:
        (lo, hi), (_, top, _, bottom) = self.y_range, self.box
        return bottom - (value - lo) / (hi - lo) * (bottom - top)


def _visible(series: Series, log_scale: bool) -> list[tuple[float, float]]:
    """The drawable points in axis units (log10 of the value on a log scale)."""
    points = []
    for x, y in zip(series.steps, series.values):
        if math.isfinite(y) and (y > 0 or not log_scale):
            points.append((float(x), math.log10(y) if log_scale else float(y)))
    return points


def _padded(lo: float, hi: float, fraction: float) -> tuple[float, float]:
    if hi - lo < 1e-12:
        return lo - 1, hi + 1
    pad = (hi - lo) * fraction
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step)
    return [k * step for k in range(first, math.floor(hi / step) + 1)]


def _y_ticks(lo: float, hi: float, log_scale: bool) -> list[tuple[float, str]]:
    """(position in axis units, label) of the y ticks: round values; on a log scale 1, 2 and 5 times each
    power of ten across up to three decades, every so many decades beyond, and round values placed
    logarithmically within one decade."""
    if not log_scale:
        return [(t, f"{t:.4g}") for t in _ticks(lo, hi)]
    if hi - lo < 1:
        return [(math.log10(v), f"{v:.3g}") for v in _ticks(10**lo, 10**hi, target=5) if v > 0]
    every = max(1, math.ceil((hi - lo) / 6))
    multiples = (1, 2, 5) if hi - lo <= 3 else (1,)
    values = [
        m * 10.0**d for d in range(math.floor(lo), math.ceil(hi) + 1) if d % every == 0 for m in multiples
    ]
    return [(math.log10(v), f"{v:g}") for v in values if lo <= math.log10(v) <= hi]


def _draw_series(draw: ImageDraw.ImageDraw, series: Series, points: list[tuple[float, float]]) -> None:
    colour = COLOURS[series.colour % len(COLOURS)]
    if series.faint:  # 30% of the colour over white
        colour = tuple(round(255 - (255 - c) * 0.3) for c in colour)
    if len(points) > 1:
        draw.line(points, fill=colour, width=SCALE if series.faint else 2 * SCALE, joint="curve")
    if series.markers or len(points) == 1:
        r = 3 * SCALE
        for x, y in points:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _legend(draw: ImageDraw.ImageDraw, series: list[Series], box: tuple, font) -> None:
    if not series:
        return
    line_height, swatch, pad = 16 * SCALE, 18 * SCALE, 6 * SCALE
    text_width = max(draw.textlength(s.label, font=font) for s in series)
    right, top = box[2] - pad, box[1] + pad
    left = right - (pad * 3 + swatch + text_width)
    draw.rectangle(
        (left, top, right, top + pad * 2 + line_height * len(series)), fill="white", outline=(200, 200, 200),
        width=SCALE,
    )
    for k, s in enumerate(series):
        y = top + pad + line_height * k + line_height / 2
        colour = COLOURS[s.colour % len(COLOURS)]
        draw.line([(left + pad, y), (left + pad + swatch, y)], fill=colour, width=2 * SCALE)
        draw.text((left + pad * 2 + swatch, y), s.label, fill="black", font=font, anchor="lm")


def _centred(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, font) -> None:
    draw.text((x, y), text, fill="black", font=font, anchor="mm")
