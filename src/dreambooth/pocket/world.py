"""The pocket world: captioned 64x64 scenes of one object in one context.

A scene is one object (class, colour, pattern, size, position, view) standing in one of
ten DreamBench-like contexts. The world is built to be learnable by a ~4M-parameter pixel
UNet at 32x32 in under an hour of CPU: six silhouettes that differ at 16x16, objects
40-60% of the image height with a dark outline, vivid object colours over muted
backgrounds, and contexts told apart by large areas of colour plus one simple texture.
Checkers, two-tone paint and emblems never occur here: they are reserved for subjects
(`dreambooth.pocket.subjects`), so a model can only make them by learning a subject.

Rendering is vectorised: every mask, shading map and pattern of every placement (class x
size x view x position) and every backdrop is drawn once, supersampled, and cached; a batch
is then a few gathers and blends (thousands of images per second, see
bench/pocket_world_speed.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from dreambooth.pocket._backdrops import BACKDROP_PAINTERS
from dreambooth.pocket._shapes import SHAPES

if TYPE_CHECKING:
    from dreambooth.pocket.subjects import Subject

SIZE = 64
"""Side of a render in pixels (the cascade's top resolution)."""
SUPERSAMPLE = 4
"""Masks and patterns are drawn at SIZE * SUPERSAMPLE and box-filtered (anti-aliasing)."""
N_VARIANTS = 4
"""Backdrop variants per context (horizon height, texture phase, light)."""

CLASSES: tuple[str, ...] = tuple(SHAPES)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 30),
    "orange": (255, 135, 0),
    "yellow": (255, 225, 0),
    "green": (20, 200, 70),
    "blue": (30, 75, 235),
    "purple": (145, 45, 210),
    "pink": (255, 85, 185),
    "white": (250, 250, 250),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
SIZES: dict[str, float] = {"small": 0.42, "large": 0.6}
"""Object height as a fraction of the image height."""
POSITIONS: dict[str, float] = {"left": 18.0, "centre": 32.0, "right": 46.0}
"""Horizontal centre of the object in pixels at SIZE = 64."""
VIEWS: dict[str, float] = {"upright": 0.0, "tilted": 30.0}
"""Rotation of the object in degrees (clockwise on screen)."""
CONTEXTS: dict[str, str] = {
    "beach": "on the beach",
    "snow": "in the snow",
    "jungle": "in the jungle",
    "grass": "on the grass",
    "wooden_floor": "on a wooden floor",
    "pink_fabric": "on pink fabric",
    "city_night": "in the city at night",
    "under_water": "under water",
    "brick_wall": "in front of a brick wall",
    "mountain": "with a mountain in the background",
}
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}

_GROUND_Y = 57.0  # bottom of an upright object, in pixels
_OUTLINE_RGB = np.array([25, 25, 30], np.float32)
_LIGHT_COLOURS = frozenset({"yellow", "white", "orange", "pink"})  # get dark stripes/dots


@dataclass(frozen=True)
class Placement:
    """Where and how a silhouette sits in the image; maps pixels to object coordinates.

    Object coordinates (u, v) put the object in [-1, 1]^2, v pointing down, whatever the
    size, position and view, so shapes and paints are written once in that frame.
    """

    cls: str
    size: str
    view: str
    position: str

    @property
    def scale(self) -> float:
        """Pixels per object unit at SIZE."""
        return SIZES[self.size] * SIZE / 2

    @property
    def centre(self) -> tuple[float, float]:
        """Pixel (x, y) of the object's origin at SIZE."""
        return POSITIONS[self.position], _GROUND_Y - self.scale

    def to_pixels(self, u: float, v: float) -> tuple[float, float]:
        """Object coordinates -> pixel coordinates (x, y) at SIZE."""
        a = np.deg2rad(VIEWS[self.view])
        cx, cy = self.centre
        return (
            cx + self.scale * float(np.cos(a) * u - np.sin(a) * v),
            cy + self.scale * float(np.sin(a) * u + np.cos(a) * v),
        )

    def object_coords(self, ss: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
        """Object coordinates (u, v) of the pixel-centre grid at SIZE * ss, each [S, S]."""
        t = (np.arange(SIZE * ss, dtype=np.float32) + 0.5) / ss
        x, y = np.meshgrid(t, t)
        a = np.deg2rad(VIEWS[self.view])
        cos, sin = float(np.cos(a)), float(np.sin(a))
        cx, cy = self.centre
        dx, dy = (x - cx) / self.scale, (y - cy) / self.scale
        return cos * dx + sin * dy, cos * dy - sin * dx


@dataclass(frozen=True)
class Scene:
    """One object in one context.

    An ordinary scene has a `colour` and a `pattern`; a subject scene has `subject` set and
    neither (the subject brings its own paint, and `cls` must be its class noun).
    """

    cls: str
    colour: str | None
    pattern: str | None
    size: str
    position: str
    view: str
    context: str
    variant: int = 0
    subject: Subject | None = None

    def __post_init__(self) -> None:
        checks = {
            "cls": (self.cls, CLASSES),
            "size": (self.size, SIZES),
            "view": (self.view, VIEWS),
            "position": (self.position, POSITIONS),
            "context": (self.context, CONTEXTS),
            "variant": (self.variant, range(N_VARIANTS)),
        }
        if self.subject is None:
            checks |= {"colour": (self.colour, COLOURS), "pattern": (self.pattern, PATTERNS)}
        elif (self.colour, self.pattern) != (None, None) or self.subject.cls != self.cls:
            raise ValueError(
                f"a subject scene needs cls={self.subject.cls!r} and colour=pattern=None, "
                f"got cls={self.cls!r}, colour={self.colour!r}, pattern={self.pattern!r}"
            )
        for field, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"Scene.{field}={value!r} is not one of {list(allowed)}")

    @property
    def placement(self) -> Placement:
        """The silhouette's placement (what the cached masks are keyed by)."""
        return Placement(self.cls, self.size, self.view, self.position)


@dataclass(frozen=True)
class _Tables:
    """Everything about the world that does not depend on colour, drawn once at SIZE."""

    index: dict[Placement, int]
    alpha: np.ndarray  # [g, S, S] object coverage
    shade: np.ndarray  # [g, S, S] multiplicative light (and dark features: eyes, rims)
    outline: np.ndarray  # [g, S, S] coverage of the 1-px outline around the object
    shadow: np.ndarray  # [g, S, S] darkening of the ground under the object
    pattern: np.ndarray  # [g, len(PATTERNS), S, S] coverage of stripes/dots ("ink")
    backdrop: np.ndarray  # [len(CONTEXTS), N_VARIANTS, S, S, 3] float RGB in [0, 255]


def box_filter(x: np.ndarray, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Average ss x ss blocks of the two leading axes: [S*ss, S*ss, ...] -> [S, S, ...]."""
    s = x.shape[0] // ss
    return x.reshape(s, ss, s, ss, *x.shape[2:]).mean(axis=(1, 3), dtype=np.float32)


def _pattern_ink(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where a pattern's ink goes, in object coordinates (bool, same shape as u)."""
    if pattern == "striped":
        return np.mod(v, 0.5) < 0.22
    if pattern == "dotted":
        du, dv = np.mod(u, 0.5) - 0.25, np.mod(v + 0.1, 0.5) - 0.25
        return du * du + dv * dv < 0.12**2
    return np.zeros_like(u, dtype=bool)


def _dilate(x: np.ndarray) -> np.ndarray:
    """3x3 max filter of a [S, S] map."""
    p = np.pad(x, 1)
    return np.max([p[i : i + x.shape[0], j : j + x.shape[1]] for i in range(3) for j in range(3)], axis=0)


def _shadow(alpha: np.ndarray, placement: Placement) -> np.ndarray:
    """A soft ellipse on the ground under the object's lowest point, [S, S]."""
    rows = np.nonzero(alpha.max(axis=1) > 0.5)[0]
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    rx, ry = 0.8 * placement.scale, 2.5
    d = ((x - placement.centre[0]) / rx) ** 2 + ((y - rows.max() - 0.5) / ry) ** 2
    return 0.45 * np.clip(1.0 - d, 0.0, 1.0) * (1.0 - alpha)


@cache
def _tables() -> _Tables:
    """Draw (once per process) every placement and backdrop of the world."""
    placements = [Placement(c, s, w, p) for c in CLASSES for s in SIZES for w in VIEWS for p in POSITIONS]
    alpha, shade, outline, shadow, pattern = [], [], [], [], []
    for pl in placements:
        u, v = pl.object_coords()
        inside, light = SHAPES[pl.cls](u, v)
        a = box_filter(inside.astype(np.float32))
        alpha.append(a)
        shade.append(box_filter(np.where(inside, light, 0.0)) / np.maximum(a, 1e-6))
        outline.append(np.clip(_dilate(a) - a, 0.0, 1.0))
        shadow.append(_shadow(a, pl))
        pattern.append(
            [
                box_filter((_pattern_ink(p, u, v) & inside).astype(np.float32)) / np.maximum(a, 1e-6)
                for p in PATTERNS
            ]
        )
    backdrop = [
        [BACKDROP_PAINTERS[c](np.random.default_rng([i, k, 2023]), SIZE) for k in range(N_VARIANTS)]
        for i, c in enumerate(CONTEXTS)
    ]
    return _Tables(
        {pl: i for i, pl in enumerate(placements)},
        *(
            np.asarray(x, np.float32)
            for x in (alpha, shade, outline, shadow, np.clip(pattern, 0.0, 1.0), backdrop)
        ),
    )


def _albedo(scenes: Sequence[Scene], t: _Tables, g: np.ndarray) -> np.ndarray:
    """Unlit object colour of each scene, [n, S, S, 3] float in [0, 255]."""
    ordinary = [i for i, s in enumerate(scenes) if s.subject is None]
    albedo = np.empty((len(scenes), SIZE, SIZE, 3), np.float32)
    if ordinary:
        names = [scenes[i].colour for i in ordinary]
        body = np.array([COLOURS[c] for c in names], np.float32)  # [m, 3]
        ink = np.where(np.isin(names, list(_LIGHT_COLOURS))[:, None], 40.0, 250.0).astype(np.float32)
        p = np.array([PATTERNS.index(scenes[i].pattern) for i in ordinary])
        cover = t.pattern[g[ordinary], p][..., None]  # [m, S, S, 1]
        albedo[ordinary] = body[:, None, None] + cover * (ink - body)[:, None, None]
    for i, s in enumerate(scenes):
        if s.subject is not None:
            albedo[i] = s.subject.albedo(s.placement)
    return albedo


def render(scenes: Sequence[Scene]) -> np.ndarray:
    """Render scenes at the cascade's top resolution (lower stages downsample it themselves).

    Returns:
        uint8 array [n, 64, 64, 3].
    """
    t = _tables()
    g = np.array([t.index[s.placement] for s in scenes], dtype=np.int64)  # [n]
    ctx = np.array([list(CONTEXTS).index(s.context) for s in scenes], dtype=np.int64)
    var = np.array([s.variant for s in scenes], dtype=np.int64)
    img = t.backdrop[ctx, var] * (1.0 - t.shadow[g])[..., None]  # [n, S, S, 3]
    outline = 0.85 * t.outline[g][..., None]
    img += outline * (_OUTLINE_RGB - img)
    obj = _albedo(scenes, t, g) * t.shade[g][..., None]
    alpha = t.alpha[g][..., None]
    img += alpha * (obj - img)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def sample_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """Draw n ordinary scenes, every attribute uniform and independent."""
    names = [CLASSES, tuple(COLOURS), PATTERNS, tuple(SIZES), tuple(POSITIONS), tuple(VIEWS), tuple(CONTEXTS)]
    picks = [rng.integers(len(options), size=n) for options in names]  # [n] each
    variants = rng.integers(N_VARIANTS, size=n)
    return [
        Scene(*(options[p[i]] for options, p in zip(names, picks, strict=True)), variant=int(variants[i]))
        for i in range(n)
    ]


def caption(scene: Scene, rng: np.random.Generator | None = None, p_drop: float = 0.5) -> str:
    """Describe a scene in plain English, e.g. "a large red striped cube on the beach on the left".

    Args:
        scene: the scene. Subject scenes are described without colour and pattern (those
            are the subject's own; a trainer adds its identifier before the noun).
        rng: drops each attribute (size, view, colour, pattern, context, position)
            independently with probability `p_drop`; None gives the full caption. The class
            noun is always kept, so the model learns "a cube" as well as specific cubes.
        p_drop: probability of dropping each attribute when `rng` is given.

    Returns:
        The caption, using only words of `caption_vocabulary()`.
    """
    keep = (lambda: True) if rng is None else (lambda: rng.random() >= p_drop)
    size, view, colour, pattern, context, position = (keep() for _ in range(6))
    words = [
        "a",
        scene.size if size else "",
        "tilted" if view and scene.view == "tilted" else "",
        (scene.colour or "") if colour else "",
        (scene.pattern or "") if pattern else "",
        scene.cls,
        CONTEXTS[scene.context] if context else "",
        POSITION_PHRASES[scene.position] if position else "",
    ]
    return " ".join(w for w in words if w)


def caption_vocabulary() -> tuple[str, ...]:
    """Every word a caption can contain, sorted (a tokenizer is trained on exactly these)."""
    phrases = [
        "a tilted",
        *CLASSES,
        *COLOURS,
        *PATTERNS,
        *SIZES,
        *CONTEXTS.values(),
        *POSITION_PHRASES.values(),
    ]
    return tuple(sorted({w for p in phrases for w in p.split()}))


def sample_dataset(n: int, seed: int, p_drop: float = 0.5) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Sample n captioned ordinary scenes, deterministically from `seed`.

    Returns:
        (images uint8 [n, 64, 64, 3], captions with attributes dropped at `p_drop`, scenes).
    """
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng)
    return render(scenes), [caption(s, rng, p_drop) for s in scenes], scenes
