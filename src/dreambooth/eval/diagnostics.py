"""Per-prompt flags for the paper's three failure modes (Ruiz et al. 2023, Sec. 5, Fig. 17).

Each flag is a documented heuristic with a configurable threshold (:class:`Thresholds`):

1. *Context not generated* (``context_missing``): the fine-tuned model's CLIP-T on a prompt
   is more than ``context_margin`` below the pretrained model's CLIP-T on the same prompt
   without the identifier. The pretrained model is the yardstick for how well that context
   can be drawn at all, so hard prompts are not flagged for being hard.
2. *Context-appearance entanglement* (``entanglement``): the subject's colour moves towards
   the context's. We measure colour as the mean CIELAB chroma (a*, b*; lightness is left
   out so that lighting changes do not count) of the central square of each image (side =
   half the shorter side), where the subject usually is: ``s`` for the real photos, ``c``
   for the pretrained model's images of the context prompt, ``g`` for the generated images.
   The *pull* is the projection of ``g - s`` on ``c - s`` divided by ``|c - s|^2``: 0 when
   the subject kept its colour, 1 when it took the context's. Flagged when the pull exceeds
   ``entanglement_pull`` and the context's colour is at least ``entanglement_min_gap``
   (Lab units) away from the subject's, so that the direction is meaningful. The central
   square also holds some background, so the pull of a faithful subject is above 0; the
   threshold leaves room for that. Property prompts ("a red [V] backpack") are not checked.
3. *Overfitting to the photos* (``overfitting``): some generated image of the prompt has a
   subject-embedder (DINO) cosine above ``overfit_similarity`` with one of the photos: a
   near copy, pose and setting included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dreambooth.eval.embedders import centre_crop_box

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

_CHROMA_SIZE = 64  # centre crops are box-filtered to 64 x 64 before the colour mean


@dataclass(frozen=True)
class Thresholds:
    """When a prompt is flagged; see the module docstring for each measure."""

    context_margin: float = 0.03
    """CLIP-T drop below the pretrained model's that counts as "context not generated" (raw cosine)."""
    entanglement_pull: float = 0.5
    """Fraction of the way from the subject's colour to the context's beyond which to flag."""
    entanglement_min_gap: float = 10.0
    """Least subject-to-context colour distance (CIELAB a*b* units) for the pull to be judged."""
    overfit_similarity: float = 0.95
    """Subject-embedder cosine with a photo above which a generated image counts as a copy."""

    def __post_init__(self) -> None:
        if self.context_margin < 0 or self.entanglement_min_gap < 0:
            raise ValueError("context_margin and entanglement_min_gap must be >= 0")
        if self.entanglement_pull <= 0:
            raise ValueError(f"entanglement_pull must be > 0, got {self.entanglement_pull}")
        if not -1 <= self.overfit_similarity <= 1:
            raise ValueError(f"overfit_similarity is a cosine in [-1, 1], got {self.overfit_similarity}")


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


def centre_chroma(images: Sequence[Image.Image]) -> Tensor:
    """Mean CIELAB (a*, b*) of each image's central square (side: half the shorter side): ``[n, 2]``."""
    rows = []
    for image in images:
        w, h = image.size
        centre = image.convert("RGB").crop(centre_crop_box(w, h, max(1, min(w, h) // 2)))
        small = centre.resize((_CHROMA_SIZE, _CHROMA_SIZE), Image.Resampling.BOX)
        rgb = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)  # [64, 64, 3]
        rows.append(rgb_to_lab(rgb)[..., 1:].mean(dim=(0, 1)))
    return torch.stack(rows) if rows else torch.empty(0, 2)


def colour_pull(generated: Tensor, subject: Tensor, context: Tensor) -> tuple[float, float]:
    """How far the generated colour moved from the subject's towards the context's.

    Args:
        generated: ``[n, 2]`` chroma of the generated images of one prompt.
        subject: ``[m, 2]`` chroma of the subject photos.
        context: ``[k, 2]`` chroma of the pretrained model's images of the same context.

    Returns:
        ``(pull, gap)``: the projection of ``mean(g) - mean(s)`` on ``mean(c) - mean(s)`` over
        ``gap^2`` (0 = subject colour kept, 1 = context colour taken), and ``gap = |mean(c) - mean(s)|``.
        The pull is 0 when the gap is 0.
    """
    s, c, g = subject.mean(0), context.mean(0), generated.mean(0)  # [2] each
    axis = c - s
    gap = axis.norm().item()
    pull = (torch.dot(g - s, axis) / gap**2).item() if gap > 0 else 0.0
    return pull, gap


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
        f"colour moved {pull:.0%} of the way from the photos' to the context's "
        f"(threshold {thresholds.entanglement_pull:.0%}; colour gap {gap:.1f} Lab units)"
    )
    return Flag(ENTANGLEMENT, pull, thresholds.entanglement_pull, evidence, EXPLANATIONS[ENTANGLEMENT])


def check_overfitting(similarity: float, photo: str, thresholds: Thresholds) -> Flag | None:
    """Flag 3: a generated image closer than ``overfit_similarity`` to the named photo."""
    if similarity <= thresholds.overfit_similarity:
        return None
    evidence = f"cosine {similarity:.3f} with photo {photo} (threshold {thresholds.overfit_similarity:.3f})"
    return Flag(OVERFITTING, similarity, thresholds.overfit_similarity, evidence, EXPLANATIONS[OVERFITTING])
