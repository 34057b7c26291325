"""Optimizers: AdamW, 8-bit AdamW and Adafactor from the config."""

from __future__ import annotations

import pytest
import torch

from dreambooth.config import OptimConfig
from dreambooth.training.optim import build_optimizer


@pytest.mark.parametrize("flags", [{}, {"use_8bit_adam": True}, {"use_adafactor": True}], ids=["adamw", "adamw8bit", "adafactor"])
def test_each_optimizer_fits_a_small_regression(flags: dict) -> None:
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(32, 8)
    target = x @ torch.randn(8, 8)
    optimizer = build_optimizer([{"params": list(layer.parameters()), "lr": 1e-2}], OptimConfig(**flags))
    losses = []
    for _ in range(60):
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], type(optimizer).__name__


def test_two_optimizers_at_once_are_refused() -> None:
    with pytest.raises(ValueError, match="use_8bit_adam and optim.use_adafactor"):
        OptimConfig(use_8bit_adam=True, use_adafactor=True)
