"""Compute the LPIPS golden distances once: `python tests/golden/make_lpips_golden.py`.

The images are synthetic and deterministic (no third-party files are committed). The
implementation itself was checked once against the LPIPS project's published example
distances (0.722 / 0.138 on its ex_ref/ex_p0/ex_p1 images); this file guards against drift.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth.eval.lpips import load_lpips

OUT = Path(__file__).with_name("lpips_golden.json")


def golden_images() -> torch.Tensor:
    """Three smooth 64x64 images in [-1, 1]: a gradient, the same with a bar, and a blurred noise field."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    gradient = torch.stack([x, y, x * y])
    bar = gradient.clone()
    bar[:, 24:40, 8:56] = torch.tensor([0.8, -0.5, 0.1])[:, None, None]
    noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    field = torch.nn.functional.interpolate(noise[None], size=64, mode="bicubic", align_corners=False)[
        0
    ].clamp(-1, 1)
    return torch.stack([gradient, bar, field])


def main() -> None:
    images = golden_images()
    model = load_lpips()
    with torch.no_grad():
        distances = {
            f"{i}-{j}": round(model(images[i : i + 1], images[j : j + 1]).item(), 6)
            for i, j in ((0, 1), (0, 2), (1, 2))
        }
    OUT.write_text(json.dumps(distances, indent=2) + "\n")
    print(distances)


if __name__ == "__main__":
    main()
