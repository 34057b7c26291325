"""`dreambooth pocket ablation`'s table: averages over subjects, per column and for the SR rows."""

from __future__ import annotations

import pytest

from dreambooth.ablation import COLUMNS, average, format_ablation
from dreambooth.pocket.evaluate import LABELS


def _metrics(value: float, detail: float | None) -> dict:
    """A demo metrics.json whose every score is `value` (and fine detail `detail`)."""
    scores = {key: value for key in LABELS} | {"detail": detail}
    models = ("pretrained", "fine-tuned", "fine-tuned base + pretrained SR")
    return {
        "scores": {model: dict(scores) for model in models},
        "sr_detail_on_renders": {"pretrained SR": value, "personalised SR": 2 * value, "bilinear": 0.4},
    }


def test_the_table_averages_each_column_over_subjects() -> None:
    results = {
        "a": {"with prior": _metrics(0.2, 0.1), "no prior": _metrics(0.6, None)},
        "b": {"with prior": _metrics(0.4, 0.3), "no prior": _metrics(0.8, None)},
    }
    table = average(results)
    assert table["DreamBooth"]["subject_fidelity"] == pytest.approx(0.3)
    assert table["DreamBooth, no prior"]["drift"] == pytest.approx(0.7)
    assert table["DreamBooth"]["detail"] == pytest.approx(0.2)
    assert "detail" not in table["DreamBooth, no prior"]  # no subject measured it
    sr = table["SR: pretrained vs personalised"]
    assert sr["renders: pretrained SR"] == pytest.approx(0.3) and sr[
        "renders: personalised SR"
    ] == pytest.approx(0.6)
    text = format_ablation(table, 2)
    assert text.startswith("mean over 2 subjects") and all(column in text for column in COLUMNS)
    assert "personalised SR 0.600" in text and "bilinear 0.400" in text
