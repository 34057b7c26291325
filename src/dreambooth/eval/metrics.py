"""Pure metric functions on embeddings and distance matrices (no models, no I/O).

The paper's metrics (Ruiz et al. 2023, Sec. 4.1 and Table 4) in these terms:

- DINO / CLIP-I: :func:`mean_cross_cosine` of generated and real image embeddings, every
  generated image against every real one; PRES the same with "a [class noun]" samples.
- Real-images upper bound: :func:`mean_self_cosine` of the real images, self-pairs excluded.
- CLIP-T: :func:`paired_cosine` of each image with its prompt's text embedding, raw cosine
  (no x100 or x2.5 rescaling as some CLIPScore variants do).
- DIV: :func:`mean_offdiagonal` of a pairwise LPIPS matrix, per prompt, then averaged.

Averaging is per subject first, then over subjects (:func:`mean_of`), so that subjects with
more images do not weigh more.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of ``a`` ``[n, d]`` with every row of ``b`` ``[m, d]``: ``[n, m]``."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def mean_cross_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine over all ``n x m`` pairs of rows of ``a`` and ``b``.

    Raises:
        ValueError: If either set is empty.
    """
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"need at least one embedding on each side, got {len(a)} and {len(b)}")
    return cosine_matrix(a, b).mean().item()


def mean_offdiagonal(matrix: Tensor) -> float:
    """Mean of the off-diagonal entries of a square ``[n, n]`` matrix (self-pairs excluded).

    Raises:
        ValueError: If ``n < 2`` (no pair left).
    """
    n = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != n:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    if n < 2:
        raise ValueError(f"need at least 2 items for pairs without self-pairs, got {n}")
    mask = ~torch.eye(n, dtype=torch.bool)
    return matrix[mask].float().mean().item()


def mean_self_cosine(a: Tensor) -> float:
    """Mean cosine over ordered pairs ``i != j`` of rows of ``a`` ``[n, d]`` (the real-vs-real row)."""
    return mean_offdiagonal(cosine_matrix(a, a))


def paired_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of each row of ``a`` with the same row of ``b`` (``b`` may be ``[1, d]``): ``[n]``."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(dim=-1)


def nearest(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``a``, the highest cosine with a row of ``b`` and that row's index.

    Returns:
        ``(similarity [n], index [n])``.
    """
    best = cosine_matrix(a, b).max(dim=1)
    return best.values, best.indices


def mean_of(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
