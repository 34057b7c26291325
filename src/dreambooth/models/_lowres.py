"""The low-res view of a photo that a super-resolution stage is trained to upscale."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def downsample(pixels: Tensor, size: int) -> Tensor:
    """High-res images [b, 3, H, W] in [-1, 1] -> [b, 3, size, size] (antialiased bicubic)."""
    return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
