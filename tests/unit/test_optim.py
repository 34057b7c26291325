"""Optimizers: AdamW, 8-bit AdamW and Adafactor from the config."""

from __future__ import annotations

import copy

import pytest
import torch

from dreambooth.config import OptimConfig
from dreambooth.training.optim import build_optimizer


@pytest.mark.parametrize(
    "flags", [{}, {"use_8bit_adam": True}, {"use_adafactor": True}], ids=["adamw", "adamw8bit", "adafactor"]
)
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


def _regression_steps(optimizer_of, steps: int, state: dict | None = None) -> tuple[torch.nn.Linear, dict]:
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(32, 8)
    target = x @ torch.randn(8, 8)
    optimizer = optimizer_of(layer.parameters())
    if state is not None:
        state = copy.deepcopy(state)  # loading shares the saved tensors, which the steps then update in place
        layer.load_state_dict(state["layer"])
        optimizer.load_state_dict(state["optimizer"])
    for _ in range(steps):
        (layer(x) - target).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return layer, {"layer": layer.state_dict(), "optimizer": optimizer.state_dict()}


def test_the_fused_adamw_makes_the_plain_update_and_resumes_a_plain_one() -> None:
    fused = lambda params: build_optimizer(
        [{"params": list(params), "lr": 1e-2}], OptimConfig(weight_decay=1e-2)
    )  # noqa: E731
    plain = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, foreach=False)  # noqa: E731
    assert fused(torch.nn.Linear(2, 2).parameters()).defaults["fused"]
    by_fused, _ = _regression_steps(fused, 40)
    by_plain, halfway = _regression_steps(plain, 20)
    by_plain, _ = _regression_steps(plain, 20, halfway)
    resumed, _ = _regression_steps(fused, 20, halfway)  # a checkpoint written before the optimizer was fused
    for layer in (by_fused, resumed):
        torch.testing.assert_close(layer.weight, by_plain.weight, rtol=1e-5, atol=1e-6)
