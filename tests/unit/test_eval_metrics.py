"""Pure metric functions against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from dreambooth.eval import metrics

SQRT_HALF = math.sqrt(0.5)


def test_cosine_matrix_ignores_scale() -> None:
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[1.0, 1.0], [5.0, 0.0], [0.0, -1.0]])
    expected = torch.tensor([[SQRT_HALF, 1.0, 0.0], [SQRT_HALF, 0.0, -1.0]])
    torch.testing.assert_close(metrics.cosine_matrix(a, b), expected)


def test_all_pairs_mean_by_hand() -> None:
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[1.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    # rows: (s, 1, 1) and (s, 0, 0) with s = sqrt(1/2): six pairs
    assert metrics.mean_cross_cosine(generated, real) == pytest.approx((2 * SQRT_HALF + 2) / 6)


def test_identical_embeddings_score_one() -> None:
    x = torch.randn(1, 16).repeat(4, 1)
    assert metrics.mean_cross_cosine(x, x[:2]) == pytest.approx(1.0)
    assert metrics.mean_self_cosine(x) == pytest.approx(1.0)


def test_self_similarity_excludes_self_pairs() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # off-diagonal cosines: 0, s, 0, s, s, s over 6 ordered pairs
    assert metrics.mean_self_cosine(x) == pytest.approx(4 * SQRT_HALF / 6)
    # with self-pairs the mean would be (3 + 4 s) / 9: the real-images row must not use it
    assert metrics.mean_cross_cosine(x, x) == pytest.approx((3 + 4 * SQRT_HALF) / 9)


def test_mean_offdiagonal_and_its_errors() -> None:
    d = torch.tensor([[0.0, 0.2, 0.4], [0.2, 0.0, 0.6], [0.4, 0.6, 0.0]])
    assert metrics.mean_offdiagonal(d) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mean_offdiagonal(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="square"):
        metrics.mean_offdiagonal(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least one"):
        metrics.mean_cross_cosine(torch.zeros(0, 2), torch.ones(1, 2))


def test_paired_cosine_broadcasts_one_text_over_images() -> None:
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    text = torch.tensor([[4.0, 0.0]])
    torch.testing.assert_close(metrics.paired_cosine(images, text), torch.tensor([1.0, SQRT_HALF, 0.0]))


def test_nearest_returns_best_similarity_and_index() -> None:
    a = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    similarity, index = metrics.nearest(a, b)
    assert index.tolist() == [1, 0]
    assert similarity[1].item() == pytest.approx(1.0)


def test_mean_of_skips_missing_values() -> None:
    assert metrics.mean_of([0.5, None, 1.0]) == pytest.approx(0.75)
    assert metrics.mean_of([None, None]) is None
