"""Evaluation while training: metrics logged and plotted, the best checkpoint exported, the prior guarded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.eval.during_training import BestCheckpointPolicy

from tiny_models import tiny_scorer_flags


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return tiny_scorer_flags(tmp_path_factory.mktemp("scorers"))


def test_metrics_are_logged_and_the_best_checkpoint_is_exported(
    tiny_sd: Path, photos: Path, tmp_path: Path, scorers
) -> None:
    run = tmp_path / "run"
    code = main([
        "train", "--model", str(tiny_sd), "--instance-dir", str(photos), "--run-dir", str(run),
        "--class-noun", "dog", "--max-steps", "4", "--learning-rate", "1e-2", "--num-class-images", "2",
        "--class-steps", "2", "--validation-every", "0", "--validation-images", "1", "--validation-steps",
        "2", "--logger", "none", "--checkpoint-every", "0", "--eval-every", "2", "--eval-images", "2",
        "--eval-prompts", "a {identifier} {class_noun} in the snow", *scorers,
    ])
    assert code == 0
    rows = [json.loads(line) for line in (run / "logs" / "eval-base.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert -1 <= row["eval/dino"] <= 1 and -1 <= row["eval/clip_t"] <= 1 and row["eval/div"] >= 0
        assert "eval/pres" in row and "eval/pres_pretrained" in row
    assert (run / "logs" / "eval-base.png").is_file()

    best = json.loads((run / "checkpoints" / "base" / "best" / "best.json").read_text())
    assert best["step"] in (2, 4) and best["scores"]["eval/dino"] == pytest.approx(
        max(r["eval/dino"] for r in rows), abs=1e-6
    )
    kept = load_file(run / "checkpoints" / "base" / "best" / "trainable.safetensors")
    exported = load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(kept[f"unet.{name}"], value) for name, value in exported.items())


def test_a_checkpoint_whose_class_prior_collapsed_is_never_the_best(caplog) -> None:
    keep_best = BestCheckpointPolicy("dino", max_pres_increase=0.1)
    healthy = {"eval/dino": 0.6, "eval/pres": 0.35, "eval/pres_pretrained": 0.3}
    collapsed = {"eval/dino": 0.9, "eval/pres": 0.45, "eval/pres_pretrained": 0.3}
    assert keep_best(healthy, None, step=10)
    with caplog.at_level(logging.WARNING):
        assert not keep_best(collapsed, healthy, step=20)
    assert "collapsing onto the subject" in caplog.text
    assert not keep_best({**healthy, "eval/dino": 0.5}, healthy, step=30)
    assert keep_best({**healthy, "eval/dino": 0.7}, healthy, step=40)
