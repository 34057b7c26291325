"""The low-res input a super-resolution stage is trained to upscale: the photo's low-res view,
noise-augmented."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dreambooth.seeding import RowRandom


def downsample(pixels: Tensor, size: int) -> Tensor:
    """High-res images [b, 3, H, W] in [-1, 1] -> [b, 3, size, size] (antialiased bicubic)."""
    return F.interpolate(
        pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    ).clamp(-1, 1)


def augment(image: Tensor, scheduler, level_range: tuple[int, int], rng: RowRandom) -> tuple[Tensor, Tensor]:
    """Noise `image` [b, 3, h, w] with `scheduler` (the pipeline's image-noising one) at a level per row drawn
    from `level_range`, inclusive (pipelines sample at its top); returns the noised image and the levels
    [b]."""
    low, high = level_range
    level = rng.randint(low, min(high, scheduler.config.num_train_timesteps - 1) + 1)
    noise = rng.randn(tuple(image.shape[1:])).to(image)
    return scheduler.add_noise(image, noise, level), level
