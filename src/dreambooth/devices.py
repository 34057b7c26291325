"""Host-to-device copies that do not make the host wait for the device."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor bound for a GPU goes through pinned memory, non-blocking,
    so the host queues the copy and moves on instead of waiting for the GPU's queue to drain."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
