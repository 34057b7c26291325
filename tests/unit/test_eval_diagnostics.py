"""Failure-mode measures: colour space, colour pull and the three checks."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dreambooth.eval import diagnostics
from dreambooth.eval.diagnostics import Thresholds


def test_rgb_to_lab_reference_values() -> None:
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = torch.tensor(
        [[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]]
    )
    torch.testing.assert_close(diagnostics.rgb_to_lab(rgb), expected, atol=0.02, rtol=0)


def test_centre_chroma_reads_the_central_square_only() -> None:
    image = Image.new("RGB", (80, 60), (0, 0, 255))
    image.paste((255, 0, 0), (25, 15, 55, 45))  # red 30 x 30 square: exactly the centre half of 60
    red = diagnostics.rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]))[1:]
    torch.testing.assert_close(diagnostics.centre_chroma([image])[0], red, atol=1e-3, rtol=0)


def test_colour_pull_by_hand() -> None:
    subject, context = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[11.0, 0.0]])
    pull, gap = diagnostics.colour_pull(torch.tensor([[6.0, 3.0]]), subject, context)  # s = (1, 0)
    assert (pull, gap) == pytest.approx((0.5, 10.0))
    assert diagnostics.colour_pull(subject, subject, subject) == (0.0, 0.0)


def test_checks_fire_only_beyond_their_thresholds() -> None:
    t = Thresholds(
        context_margin=0.05, entanglement_pull=0.5, entanglement_min_gap=10, overfit_similarity=0.9
    )
    assert diagnostics.check_context(0.28, 0.30, t) is None
    assert diagnostics.check_context(0.20, 0.30, t).kind == diagnostics.CONTEXT_MISSING
    assert diagnostics.check_entanglement(0.8, 5.0, t) is None  # context colour too close to judge
    assert diagnostics.check_entanglement(0.4, 30.0, t) is None
    assert diagnostics.check_entanglement(0.8, 30.0, t).kind == diagnostics.ENTANGLEMENT
    assert diagnostics.check_overfitting(0.9, "00.jpg", t) is None
    flag = diagnostics.check_overfitting(0.97, "00.jpg", t)
    assert flag.kind == diagnostics.OVERFITTING and "00.jpg" in flag.evidence
    assert flag.explanation == diagnostics.EXPLANATIONS[diagnostics.OVERFITTING]


@pytest.mark.parametrize(
    "bad", [{"context_margin": -0.1}, {"entanglement_pull": 0.0}, {"overfit_similarity": 1.5}]
)
def test_thresholds_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        Thresholds(**bad)
