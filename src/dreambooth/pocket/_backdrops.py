"""Backdrops of the pocket world's ten contexts.

Each painter draws one full-image background, float RGB [s, s, 3] in [0, 255], from a
generator that varies the horizon, texture phase and light between variants. A context is
recognisable from its dominant colours alone (even at 8x8) plus one simple texture:
sand and sea, white ground, dark leaves, green blades, planks, pink folds, lit windows on
a dark sky, bubbles in blue, bricks, and a grey peak with a white cap.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Painter = Callable[[np.random.Generator, int], np.ndarray]


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each [s, s]."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    return y, x


def _fill(s: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.float32), (s, s, 3)).copy()


def _paint(img: np.ndarray, where: np.ndarray, rgb: tuple[int, int, int]) -> None:
    img[where] = rgb


def _noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1], [s, s]: a random (cells+1)^2 grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    t = (np.arange(s, dtype=np.float32) + 0.5) * cells / s
    i = np.minimum(t.astype(int), cells - 1)
    w = t - i
    rows = grid[i] * (1 - w)[:, None] + grid[i + 1] * w[:, None]  # [s, cells + 1]
    return rows[:, i] * (1 - w) + rows[:, i + 1] * w


def beach(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    horizon = s * (0.3 + 0.05 * rng.random())
    img = _fill(s, (235, 210, 150))
    img *= (0.92 + 0.16 * _noise(rng, s, 16))[..., None]
    _paint(img, y < horizon + s * 0.12, (25, 130, 195))
    _paint(img, (y >= horizon) & (y < horizon + s * 0.12) & (np.sin(x * 0.8 + 3 * y) > 0.85), (220, 240, 250))
    _paint(img, y < horizon, (150, 205, 245))
    return img


def snow(rng: np.random.Generator, s: int) -> np.ndarray:
    y, _ = _grid(s)
    horizon = s * (0.3 + 0.06 * rng.random())
    img = _fill(s, (246, 248, 252))
    img -= (18 * _noise(rng, s, 8))[..., None] * np.array([1.0, 0.7, 0.0], np.float32)  # blue shadows
    sky = y < horizon
    img[sky] = (195, 203, 215)
    flakes = rng.random((s, s)) < 0.06
    _paint(img, flakes & (y < s * 0.8), (255, 255, 255))
    return img


def jungle(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    img = _fill(s, (20, 75, 30))
    for _ in range(14):  # large pointed leaves in random directions
        cx, cy, a = rng.random() * s, rng.random() * s, rng.random() * np.pi
        du, dv = np.cos(a) * (x - cx) + np.sin(a) * (y - cy), -np.sin(a) * (x - cx) + np.cos(a) * (y - cy)
        leaf = (du / (s * 0.2)) ** 2 + (dv / (s * 0.07)) ** 2 <= 1.0
        img[leaf] = (45 + 30 * rng.random(), 135 + 30 * rng.random(), 40)
    vines = np.abs(np.mod(x + 3 * np.sin(y / 5) + rng.random() * 20, s / 3) - 1) < 0.8
    _paint(img, vines, (95, 60, 20))
    return img


def grass(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    horizon = s * (0.3 + 0.05 * rng.random())
    img = _fill(s, (100, 180, 55))
    blades = rng.random(s)[x.astype(int)] * (np.mod(y + 7 * rng.random(s)[x.astype(int)], 6) < 4)
    img += (40 * blades - 20)[..., None] * np.array([0.6, 1.0, 0.3], np.float32)
    _paint(img, y < horizon, (115, 175, 240))
    return img


def wooden_floor(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    horizon = s * (0.2 + 0.05 * rng.random())
    plank = np.floor((y - horizon) / (s / 9))
    shift = rng.random(16)[plank.astype(int) % 16] * s
    grain = 0.88 + 0.12 * np.sin(x / 3 + 2 * np.sin((x + shift) / 9) + plank)
    img = (
        np.array([170, 108, 55], np.float32)
        * (grain * (0.9 + 0.2 * rng.random(16)[plank.astype(int) % 16]))[..., None]
    )
    joints = (np.mod(y - horizon, s / 9) < 1.0) | (np.abs(np.mod(x + shift, s * 0.75)) < 1.0)
    _paint(img, joints, (80, 48, 25))
    _paint(img, y < horizon, (215, 195, 165))
    return img


def pink_fabric(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    folds = 0.88 + 0.12 * np.sin((x + 0.6 * y) / (s / 10) + 6 * rng.random() + 1.5 * _noise(rng, s, 3))
    weave = 1.0 + 0.04 * ((x.astype(int) + y.astype(int)) % 2)
    return np.array([240, 160, 195], np.float32) * (folds * weave)[..., None]


def city_night(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    img = np.array([12, 15, 45], np.float32) + (y / s)[..., None] * np.array([25, 15, 40], np.float32)
    edges = np.cumsum(rng.integers(s // 10, s // 5, size=s // 4))
    building = np.searchsorted(edges, x.astype(int), side="right")  # which building a column is in
    roof = (s * (0.15 + 0.45 * rng.random(len(edges) + 1)))[building]
    inside = y >= roof
    img[inside] = (28, 28, 38)
    windows = inside & (np.mod(x, 4) < 2) & (np.mod(y, 5) < 2) & (rng.random((s, s)) < 0.6)
    windows &= rng.random(len(edges) + 1)[building] < 0.85
    _paint(img, windows, (255, 215, 90))
    _paint(
        img,
        (y - s * 0.12) ** 2 + (x - s * (0.15 + 0.7 * rng.random())) ** 2 < (s * 0.07) ** 2,
        (235, 235, 200),
    )
    return img


def under_water(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    depth = (y / s)[..., None]
    img = (1 - depth) * np.array([20, 160, 190], np.float32) + depth * np.array([5, 55, 125], np.float32)
    img += (30 * np.clip(np.sin(x / 3 + 2 * np.sin(y / 4 + 6 * rng.random())), 0.6, 1.0) - 18)[..., None] * (
        1 - depth
    )
    for _ in range(9):  # bubble rings
        cx, cy, r = rng.random() * s, rng.random() * s, s * (0.025 + 0.03 * rng.random())
        d = np.hypot(x - cx, y - cy)
        _paint(img, np.abs(d - r) < 0.7, (200, 240, 255))
    return img


def brick_wall(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    row_h, brick_w = s / 10, s / 5
    row = np.floor(y / row_h)
    offset = np.where(row % 2 == 1, brick_w / 2, 0.0) + rng.random() * brick_w
    brick = row * 97 + np.floor((x + offset) / brick_w)
    tone = 0.85 + 0.25 * rng.random(2000)[brick.astype(int) % 2000]
    img = np.array([175, 68, 48], np.float32) * tone[..., None]
    mortar = (np.mod(y, row_h) < 1.0) | (np.mod(x + offset, brick_w) < 1.0)
    _paint(img, mortar, (205, 195, 185))
    _paint(img, y > s * (0.88 + 0.04 * rng.random()), (125, 125, 130))
    return img


def mountain(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = _grid(s)
    peak_x, peak_y, base_y = s * (0.35 + 0.3 * rng.random()), s * (0.08 + 0.05 * rng.random()), s * 0.72
    img = _fill(s, (125, 180, 240))
    slope = np.abs(x - peak_x) / (s * 0.7)
    rock = y >= peak_y + (base_y - peak_y) * slope
    img[rock] = (120, 115, 135)
    img[rock & (x > peak_x)] = (95, 90, 110)  # shaded flank
    _paint(img, rock & (y < peak_y + s * 0.14 + 2 * np.sin(x / 2)), (250, 250, 255))
    _paint(img, y >= base_y, (120, 130, 70))
    return img


BACKDROP_PAINTERS: dict[str, Painter] = {
    "beach": beach,
    "snow": snow,
    "jungle": jungle,
    "grass": grass,
    "wooden_floor": wooden_floor,
    "pink_fabric": pink_fabric,
    "city_night": city_night,
    "under_water": under_water,
    "brick_wall": brick_wall,
    "mountain": mountain,
}
"""Context name -> painter, keyed like `world.CONTEXTS`."""
