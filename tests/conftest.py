"""Shared fixtures: tiny models of the real classes, built once per session, and subject photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import build_tiny_sd, build_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline folder (epsilon prediction)."""
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline folder with v-prediction (as SD 2.x 768)."""
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline folder (two text encoders of different vocabularies, 64x64 px)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def write_photos(folder: Path, n: int = 4, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """`n` synthetic subject photos: a red square on a random background, like casual shots."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.empty((size[1], size[0], 3), np.uint8)
        pixels[:] = rng.integers(0, 255, 3)
        x, y = rng.integers(4, 12, 2)
        pixels[y : y + 20, x : x + 20] = (200, 30, 30)
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")
    return folder


def overfit(stage, batch, modules, *, steps: int, lr: float) -> tuple[list[float], dict]:
    """Train `modules` on one fixed batch with AdamW (prior weight 1): each step's loss, and the last step's
    terms."""
    from dreambooth.training.step import compute_loss

    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=lr)
    losses, terms = [], {}
    for _ in range(steps):
        loss, terms = compute_loss(stage, batch, prior_weight=1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, terms


def record_unet_inputs(unet, calls: list) -> None:
    """Append every call's input sample, timestep and class_labels to `calls` (training and sampling
    alike)."""
    forward = unet.forward

    def recording(sample, timestep, *args, class_labels=None, **kwargs):
        calls.append({"sample": sample.detach().clone(), "t": timestep, "class_labels": class_labels})
        return forward(sample, timestep, *args, class_labels=class_labels, **kwargs)

    unet.forward = recording


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_photos(tmp_path / "photos")


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny IF-format cascade folder (stage_1/ base 16x16, stage_2/ super-resolution to 32x32)."""
    from tiny_models import build_tiny_cascade

    return build_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-cascade")


@pytest.fixture(scope="session")
def tiny_if(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepFloyd IF cascade with the released models' properties (learned variance, cased T5;
    tiny_if.py)."""
    from tiny_if import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("models") / "tiny-if")


@pytest.fixture(scope="session")
def tiny_if_x4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_if` with a third stage: a tiny Stable Diffusion x4 upscaler in stage_3/ (32 -> 128 px)."""
    from tiny_if import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("models") / "tiny-if-x4", upscaler=True)
