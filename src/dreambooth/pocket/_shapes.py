"""Silhouettes of the pocket world's object classes, in object coordinates.

Each shape maps object coordinates (u, v) (the object spans about [-1, 1]^2, v pointing
down, light from the upper left) to `(inside, light)`: a bool mask and a multiplicative
shading map (about 0.5-1.3) that also draws dark features (eyes, the inside of a cup).
The silhouettes are chosen to differ at 16x16: round, blocky, tapered with a handle,
pointed, tall and thin, and stacked circles with ears.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Shape = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _disc(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float | None = None
) -> np.ndarray:
    """Inside of the ellipse centred at (cu, cv) with radii (ru, rv)."""
    rv = ru if rv is None else rv
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _cylinder_light(u: np.ndarray, half_width: np.ndarray | float) -> np.ndarray:
    """Lambert light across a vertical cylinder lit from the left."""
    x = np.clip(u / half_width, -1.0, 1.0)
    return 0.6 + 0.55 * np.sqrt(1.0 - x * x) - 0.15 * x


def ball(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r2 = (u * u + (v - 0.1) ** 2) / 0.88**2
    nz = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))  # sphere normal, z component
    highlight = np.exp(-((u + 0.3) ** 2 + (v + 0.25) ** 2) / 0.04)
    return r2 <= 1.0, 0.5 + 0.6 * nz + 0.3 * highlight


def cube(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Front face, then a top face and a right face drawn in oblique projection.
    front = (u >= -0.85) & (u <= 0.45) & (v >= -0.5) & (v <= 0.95)
    depth = np.clip(-(v + 0.5), 0.0, None)  # how far up the top face we are
    top = (v < -0.5) & (v >= -0.9) & (u >= -0.85 + depth) & (u <= 0.45 + depth)
    side_depth = u - 0.45
    side = (u > 0.45) & (u <= 0.85) & (v >= -0.5 - side_depth) & (v <= 0.95 - side_depth)
    light = np.select([top, side], [1.25, 0.65], 0.95)
    return front | top | side, light


def cup(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = 0.62 - 0.14 * (v + 0.6) / 1.55  # tapers towards the bottom
    body = (np.abs(u) <= half) & (v >= -0.6) & (v <= 0.95)
    rim = _disc(u, v, 0.0, -0.6, 0.62, 0.16)
    inner = _disc(u, v, 0.0, -0.6, 0.52, 0.11)
    handle = _disc(u, v, 0.62, 0.1, 0.36, 0.4) & ~_disc(u, v, 0.62, 0.1, 0.2, 0.24) & (u > 0.5)
    light = np.where(inner, 0.45, np.where(handle & ~body, 0.8, _cylinder_light(u, half)))
    return body | rim | handle, light


def star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outer, inner_r, sector = 1.0, 0.45, 2 * np.pi / 5
    y = v - 0.08
    r, theta = np.hypot(u, y), np.arctan2(u, -y)  # theta = 0 points up
    phi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)  # angle to the nearest tip
    px, py = r * np.cos(phi), r * np.sin(phi)
    # Inside when on the origin's side of the edge from the tip to the nearest notch.
    qx, qy = inner_r * np.cos(sector / 2) - outer, inner_r * np.sin(sector / 2)
    inside = qx * py - qy * (px - outer) >= 0.0
    return inside, 1.0 - 0.25 * (u + y) + 0.15 * np.cos(5 * theta)


def bottle(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shoulder = np.clip((v + 0.55) / 0.35, 0.0, 1.0)  # 0 at the neck, 1 at the body
    half = np.where(v < -0.55, 0.17, 0.17 + 0.25 * shoulder)
    inside = (np.abs(u) <= half) & (v >= -0.85) & (v <= 0.95)
    cap = (np.abs(u) <= 0.22) & (v >= -1.0) & (v < -0.8)
    return inside | cap, np.where(cap, 0.5, _cylinder_light(u, half))


def teddy(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    body = _disc(u, v, 0.0, 0.45, 0.6, 0.5)
    head = _disc(u, v, 0.0, -0.35, 0.45)
    ears = _disc(u, v, -0.36, -0.75, 0.18) | _disc(u, v, 0.36, -0.75, 0.18)
    arms = _disc(u, v, -0.58, 0.25, 0.17, 0.26) | _disc(u, v, 0.58, 0.25, 0.17, 0.26)
    muzzle = _disc(u, v, 0.0, -0.22, 0.2, 0.14)
    dark = _disc(u, v, -0.16, -0.44, 0.065) | _disc(u, v, 0.16, -0.44, 0.065) | _disc(u, v, 0.0, -0.27, 0.07)
    light = np.select([dark, muzzle], [0.2, 1.3], 1.05 - 0.2 * (u + v))
    return body | head | ears | arms, light


SHAPES: dict[str, Shape] = {
    "ball": ball,
    "cube": cube,
    "cup": cup,
    "star": star,
    "bottle": bottle,
    "teddy": teddy,
}
"""Object class name -> shape, in the order of `world.CLASSES`."""
