"""DreamBooth subjects of the pocket world: specific objects the world never draws.

A subject keeps its class's silhouette (so "a [V] cube" is still a cube) but has its own
paint, which ordinary scenes never produce: a two-colour checker, a two-tone split or a
scarf, and a round badge carrying a 5x5 glyph. The paint and the badge are visible at
32x32; the glyph's strokes are about 1.4 px wide at 64x64 and blur away at 32x32, so only
a (personalised) super-resolution stage can put them back. That is what
`PocketScorer.detail_score` measures.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth.pocket.world import (
    CLASSES,
    CONTEXTS,
    N_VARIANTS,
    POSITIONS,
    SIZES,
    VIEWS,
    Placement,
    Scene,
    box_filter,
    render,
)

RGB = tuple[int, int, int]
STYLES: tuple[str, ...] = ("checker", "two_tone", "scarf")
BADGE_RADIUS = 0.3
"""Badge radius in object units (about 6 px for a large subject at 64x64)."""
GLYPH_SIDE = 0.36
"""Side of the 5x5 glyph's square in object units (cells of about 1.4 px at 64x64)."""
BADGE_ANCHORS: dict[str, tuple[float, float]] = {
    "ball": (0.0, 0.1),
    "cube": (-0.2, 0.22),
    "cup": (0.0, 0.2),
    "star": (0.0, 0.12),
    "bottle": (0.0, 0.4),
    "teddy": (0.0, 0.45),
}
"""Badge centre in object coordinates (u, v) for each class: the middle of the largest flat part."""


@dataclass(frozen=True)
class Subject:
    """One subject: a class noun plus paint that no ordinary scene has.

    Attributes:
        name: folder-friendly name.
        cls: class noun, one of `world.CLASSES`.
        style: body paint, one of STYLES.
        colours: the body's two colours (checker squares, top/bottom halves, body/scarf).
        badge: badge colour.
        ink: glyph colour.
        glyph: 5 rows of 5 characters, "#" for ink and "." for badge.
        size: one of `world.SIZES`; subjects are large so that the glyph is legible at 64x64.
    """

    name: str
    cls: str
    style: str
    colours: tuple[RGB, RGB]
    badge: RGB
    ink: RGB
    glyph: tuple[str, ...]
    size: str = "large"

    def __post_init__(self) -> None:
        if self.cls not in CLASSES or self.style not in STYLES or self.size not in SIZES:
            raise ValueError(
                f"subject {self.name!r}: cls={self.cls!r}, style={self.style!r}, size={self.size!r} "
                f"must be in {CLASSES}, {STYLES}, {tuple(SIZES)}"
            )
        if len(self.glyph) != 5 or any(len(row) != 5 or set(row) - {"#", "."} for row in self.glyph):
            raise ValueError(
                f"subject {self.name!r}: glyph must be 5 rows of 5 '#'/'.' characters, got {self.glyph}"
            )

    def scene(self, context: str, position: str = "centre", view: str = "upright", variant: int = 0) -> Scene:
        """This subject in a context, e.g. `render([subject.scene("snow")])` for a reference image."""
        return Scene(self.cls, None, None, self.size, position, view, context, variant, subject=self)

    def albedo(self, placement: Placement) -> np.ndarray:
        """Unlit paint at a placement, float [64, 64, 3] in [0, 255] (cached)."""
        return _albedo(self, placement)

    def badge_centre(self, placement: Placement) -> tuple[float, float]:
        """Pixel (x, y) of the badge centre at 64x64."""
        return placement.to_pixels(*BADGE_ANCHORS[self.cls])


def _body_second_colour(style: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the body takes its second colour, in object coordinates (bool)."""
    if style == "checker":
        return (np.floor(u / 0.34) + np.floor(v / 0.34)) % 2 == 1
    if style == "two_tone":
        return u + 0.5 * v > 0.0
    return np.abs(v + 0.02) < 0.11  # scarf: a band at a teddy's neck, a belt elsewhere


@lru_cache(maxsize=1024)
def _albedo(subject: Subject, placement: Placement) -> np.ndarray:
    """Body paint, badge and glyph, drawn supersampled in object coordinates, [64, 64, 3]."""
    u, v = placement.object_coords()  # [S*ss, S*ss] each
    au, av = BADGE_ANCHORS[subject.cls]
    du, dv = u - au, v - av
    col = np.floor((du / GLYPH_SIDE + 0.5) * 5).astype(np.int64)
    row = np.floor((dv / GLYPH_SIDE + 0.5) * 5).astype(np.int64)
    in_square = (col >= 0) & (col < 5) & (row >= 0) & (row < 5)
    glyph = np.array([[c == "#" for c in r] for r in subject.glyph])
    ink = in_square & glyph[np.clip(row, 0, 4), np.clip(col, 0, 4)]
    # Paint index per supersample: 0/1 body colours, 2 badge, 3 ink.
    paint = _body_second_colour(subject.style, u, v).astype(np.int64)
    paint = np.where(du * du + dv * dv <= BADGE_RADIUS**2, 2 + ink, paint)
    palette = np.array([*subject.colours, subject.badge, subject.ink], np.float32)  # [4, 3]
    return box_filter(palette[paint])


def _vivid(hue: float, value: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, 0.85, value)
    return round(255 * r), round(255 * g), round(255 * b)


def make_subject(seed: int) -> Subject:
    """A new random subject: random class, style, two contrasting colours and glyph.

    Deterministic in `seed`. The scorer is trained on subjects from seeds >= 10_000
    (`_scorer_net.TRAIN_SUBJECT_SEEDS`); use smaller seeds for held-out subjects.
    """
    rng = np.random.default_rng([seed, 7])
    hue = rng.random()
    colours = (_vivid(hue, 0.95), _vivid(hue + rng.uniform(0.3, 0.7), 0.55))  # differ in hue and lightness
    glyph = rng.random((5, 5)) < 0.45
    while not 8 <= glyph.sum() <= 16:
        glyph = rng.random((5, 5)) < 0.45
    return Subject(
        name=f"subject{seed}",
        cls=CLASSES[rng.integers(len(CLASSES))],
        style=STYLES[rng.integers(len(STYLES))],
        colours=colours if rng.random() < 0.5 else colours[::-1],
        badge=(250, 250, 245) if rng.random() < 0.5 else (255, 235, 120),
        ink=(20, 20, 60),
        glyph=tuple("".join("#" if on else "." for on in row) for row in glyph),
    )


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject(
            "checker_cube",
            "cube",
            "checker",
            ((245, 125, 20), (20, 140, 150)),
            (250, 250, 245),
            (15, 15, 40),
            ("#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
        ),
        Subject(
            "twotone_ball",
            "ball",
            "two_tone",
            ((200, 20, 70), (250, 215, 110)),
            (250, 250, 245),
            (15, 15, 40),
            ("..#..", ".###.", "#.#.#", "..#..", "..#.."),
        ),
        Subject(
            "scarf_teddy",
            "teddy",
            "scarf",
            ((150, 95, 50), (30, 170, 90)),
            (255, 235, 120),
            (60, 10, 10),
            (".#.#.", ".#.#.", ".....", "#...#", ".###."),
        ),
    )
}
"""Three ready subjects of different classes: an X on a checker cube, an arrow on a two-tone
ball, a smile on a brown teddy with a green scarf (brown is no colour of the world)."""


def photo_scenes(subject: Subject, n: int = 5, seed: int = 0) -> list[Scene]:
    """The scenes of n "casual photos" of a subject, each in a different context.

    Positions, views and backdrop variants are drawn at random too, as a user would take them.

    Raises:
        ValueError: if n exceeds the number of contexts.
    """
    if not 1 <= n <= len(CONTEXTS):
        raise ValueError(
            f"subject_photos: n={n}, but photos are taken in distinct contexts (1-{len(CONTEXTS)})"
        )
    rng = np.random.default_rng([seed, 11])
    contexts = rng.permutation(list(CONTEXTS))[:n]
    return [
        subject.scene(
            str(c),
            str(rng.choice(list(POSITIONS))),
            str(rng.choice(list(VIEWS))),
            int(rng.integers(N_VARIANTS)),
        )
        for c in contexts
    ]


def subject_photos(subject: Subject, n: int = 5, seed: int = 0) -> list[Image.Image]:
    """n "casual photos" of a subject, 64x64 RGB: `photo_scenes` rendered."""
    return [Image.fromarray(img) for img in render(photo_scenes(subject, n, seed))]


def write_subject_photos(subject: Subject, folder: str | Path, n: int = 5, seed: int = 0) -> list[Path]:
    """Write `subject_photos` as PNGs into `folder` (created), the way a user's photo folder looks.

    Returns:
        The written paths, `folder/<subject.name>_<i>.png`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{subject.name}_{i}.png" for i in range(n)]
    for path, photo in zip(paths, subject_photos(subject, n, seed), strict=True):
        photo.save(path)
    return paths
