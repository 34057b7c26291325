"""Per-prompt flags for the paper's three failure modes (Ruiz et al. 2023, Sec. 5, Fig. 17).

Each flag compares one measure with a threshold of :class:`~dreambooth.options.Thresholds`,
calibrated on pocket-world renders where the truth is known (``docs/failure-flags.md``,
``bench/calibrate_flags.py``). The colour measures read :func:`lab_thumbnails`: each image's
centre square (side: its shorter side) in CIELAB, box-filtered to 16 x 16.

1. *Context not generated* (``context_missing``): the fine-tuned model's CLIP-T on a prompt
   is more than ``context_margin`` below the pretrained model's CLIP-T on the same prompt
   without the identifier. The pretrained model is the yardstick for how well that context
   can be drawn at all, so hard prompts are not flagged for being hard.
2. *Context-appearance entanglement* (``entanglement``): the subject's colour moved towards
   the context's. Colours are mean CIELAB (lightness included, so that white and black
   differ). The subject's colour is the mean of the quarter of the central square's cells (the
   square of half the side, where the subject usually is) least like the image's border ring
   (the outer eighth of each side, mostly background): ``s`` for the photos, ``g`` for the
   generated images. The context's colour ``c`` is the border ring of the pretrained model's
   images of the same prompt: their background, not their class member, whose colour is
   arbitrary, so that drawing a generic class member (identity loss) is not taking the
   context's colour. The *pull* ``1 - |g - c| / |s - c|`` is 0 when the subject kept its
   colour, 1 when it took the context's, and below 0 when it moved anywhere else. Flagged
   when the pull exceeds ``entanglement_pull`` and ``|s - c|`` is at least
   ``entanglement_min_gap`` (Lab units), so that "towards the context" means something.
   Property prompts ("a red [V] backpack") are not checked.
3. *Overfitting to the photos* (``overfitting``): some generated image is a near copy of one
   of the photos, pose and setting included: the similarity ``1 - mean ΔE / 100`` of their
   thumbnails (ΔE: the CIELAB distance of two cells; clipped at 0) exceeds ``overfit_similarity``.
   A subject embedder (DINO) cannot tell: it is meant to score a faithful new view as high
   as a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dreambooth.eval.embedders import centre_crop_box
from dreambooth.options import Thresholds

CONTEXT_MISSING = "context_missing"
ENTANGLEMENT = "entanglement"
OVERFITTING = "overfitting"

EXPLANATIONS: dict[str, str] = {
    CONTEXT_MISSING: (
        "The prompted context was not generated: these images match the prompt (CLIP-T) clearly "
        "worse than the pretrained model's images of the same prompt without the identifier."
    ),
    ENTANGLEMENT: (
        "Context-appearance entanglement: the subject's colour moved away from its colour in the "
        "photos towards the colour of the prompted context."
    ),
    OVERFITTING: (
        "Overfitting to the training photos: a generated image is a near copy of one of the subject "
        "photos, which happens when the prompt resembles the photos' own setting."
    ),
}
"""One sentence per failure mode, carried in every :class:`Flag` and in the report."""

THUMBNAIL = 16
"""Side of the CIELAB thumbnails every colour measure reads."""
_CENTRE = slice(THUMBNAIL // 4, THUMBNAIL - THUMBNAIL // 4)  # the central square: half the side
_RING = THUMBNAIL // 8  # width of the border ring

DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Flag:
    """One failure mode seen on one prompt."""

    kind: str
    """``context_missing``, ``entanglement`` or ``overfitting``."""
    value: float
    threshold: float
    evidence: str
    """The numbers behind the flag, in words."""
    explanation: str
    """What the failure mode is (:data:`EXPLANATIONS`)."""


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] ``[..., 3]`` to CIELAB (D65 white) ``[..., 3]``."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = torch.tensor(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ to_xyz.T / torch.tensor([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    lightness = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return torch.stack([lightness, a, b], dim=-1)


def lab_thumbnails(images: Sequence[Image.Image]) -> Tensor:
    """CIELAB of each image's centre square (side: the shorter side), box-filtered: ``[n, 16, 16, 3]``."""
    rows = []
    for image in images:
        w, h = image.size
        square = image.convert("RGB").crop(centre_crop_box(w, h, min(w, h)))
        small = square.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
        rows.append(rgb_to_lab(torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)))
    return torch.stack(rows) if rows else torch.empty(0, THUMBNAIL, THUMBNAIL, 3)


def border_colour(thumbnails: Tensor) -> Tensor:
    """Mean CIELAB of the border ring (the outer eighth of each side) of each thumbnail: ``[n, 3]``."""
    ring = torch.ones(THUMBNAIL, THUMBNAIL, dtype=torch.bool)
    ring[_RING:-_RING, _RING:-_RING] = False
    return thumbnails[:, ring].mean(dim=1)


def subject_colour(thumbnails: Tensor) -> Tensor:
    """Mean CIELAB of the quarter of each central square's cells least like its border ring: ``[n, 3]``."""
    centre = thumbnails[:, _CENTRE, _CENTRE].flatten(1, 2)  # [n, cells, 3]
    unlike = (centre - border_colour(thumbnails)[:, None]).norm(dim=-1)  # [n, cells]
    keep = unlike.topk(centre.shape[1] // 4, dim=1).indices  # [n, cells / 4]
    return centre.gather(1, keep[..., None].expand(-1, -1, 3)).mean(dim=1)


def colour_pull(generated: Tensor, photos: Tensor, context: Tensor) -> tuple[float, float]:
    """How much closer the subject's colour came to the context's (module docstring, flag 2).

    Args:
        generated: ``[n, 16, 16, 3]`` thumbnails of the generated images of one prompt.
        photos: ``[m, 16, 16, 3]`` thumbnails of the subject photos.
        context: ``[k, 16, 16, 3]`` thumbnails of the pretrained model's images of the same prompt
            without the identifier.

    Returns:
        ``(pull, gap)``: ``1 - |g - c| / gap`` with ``gap = |c - s|`` (0 = subject colour kept,
        1 = context colour taken, < 0 = moved elsewhere); the pull is 0 when the gap is 0.
    """
    s, g = subject_colour(photos).mean(0), subject_colour(generated).mean(0)  # [3] each
    c = border_colour(context).mean(0)
    gap = (c - s).norm().item()
    pull = 1 - (g - c).norm().item() / gap if gap > 0 else 0.0
    return pull, gap


def copy_similarity(generated: Tensor, photos: Tensor) -> tuple[float, int]:
    """The most similar (generated image, photo) pair: ``1 - mean ΔE / 100`` of their thumbnails, clipped at
    0.

    Args:
        generated: ``[n, 16, 16, 3]`` thumbnails of the generated images of one prompt.
        photos: ``[m, 16, 16, 3]`` thumbnails of the subject photos.

    Returns:
        ``(similarity, photo)``: the highest similarity (1 = identical) and the index of its photo.
    """
    distance = (generated[:, None] - photos[None]).norm(dim=-1).mean(dim=(2, 3))  # [n, m]
    best = int(distance.argmin())
    return max(0.0, 1 - distance.flatten()[best].item() / 100), best % photos.shape[0]


def check_context(clip_t: float, clip_t_pretrained: float, thresholds: Thresholds) -> Flag | None:
    """Flag 1: CLIP-T more than ``context_margin`` below the pretrained model's."""
    drop = clip_t_pretrained - clip_t
    if drop <= thresholds.context_margin:
        return None
    evidence = (
        f"CLIP-T {clip_t:.3f} vs {clip_t_pretrained:.3f} for the pretrained model: "
        f"{drop:.3f} lower (margin {thresholds.context_margin:.3f})"
    )
    return Flag(CONTEXT_MISSING, drop, thresholds.context_margin, evidence, EXPLANATIONS[CONTEXT_MISSING])


def check_entanglement(pull: float, gap: float, thresholds: Thresholds) -> Flag | None:
    """Flag 2: the subject's colour pulled towards the context's beyond ``entanglement_pull``."""
    if gap < thresholds.entanglement_min_gap or pull <= thresholds.entanglement_pull:
        return None
    evidence = (
        f"colour came {pull:.0%} of the way from the photos' to the context's "
        f"(threshold {thresholds.entanglement_pull:.0%}; colour gap {gap:.1f} Lab units)"
    )
    return Flag(ENTANGLEMENT, pull, thresholds.entanglement_pull, evidence, EXPLANATIONS[ENTANGLEMENT])


def check_overfitting(similarity: float, photo: str, thresholds: Thresholds) -> Flag | None:
    """Flag 3: a generated image more similar than ``overfit_similarity`` to the named photo."""
    if similarity <= thresholds.overfit_similarity:
        return None
    evidence = (
        f"thumbnail similarity {similarity:.3f} with photo {photo} (threshold "
        f"{thresholds.overfit_similarity:.3f})"
    )
    return Flag(OVERFITTING, similarity, thresholds.overfit_similarity, evidence, EXPLANATIONS[OVERFITTING])
