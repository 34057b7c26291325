"""Per-row random streams: the randomness of a training row depends only on (seed, step, row).

Drawing noise, timesteps and augmentations per row, from a generator seeded by the row's global
index, makes a step independent of how rows are split over processes, micro-batches and
restarts: two processes reproduce the update of one with the same global batch, and a resumed
run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib

import torch

from dreambooth.devices import to_device


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowRandom:
    """One `torch.Generator` per batch row; every draw returns a tensor stacked over rows.

    The draws are made on the CPU, whatever the device (the same numbers on every machine), and
    sent to the device without blocking the host (`to_device`).
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal [rows, *shape]."""
        rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        return to_device(torch.stack(rows), self.device).to(dtype)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """Integers in [low, high), one per row: [rows]."""
        rows = [torch.randint(low, high, (1,), generator=g) for g in self.generators]
        return to_device(torch.cat(rows), self.device)

    def rand(self) -> torch.Tensor:
        """Uniform [0, 1), one per row: [rows]."""
        return to_device(torch.cat([torch.rand(1, generator=g) for g in self.generators]), self.device)
