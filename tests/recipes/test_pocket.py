"""The built-in pocket model: the committed weights load in stock IF pipelines, draw what the
prompt asks, and a short DreamBooth run (the demo's protocol) learns the subject."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth.demo import run_demo
from dreambooth.generate import generate, load_model
from dreambooth.pocket.scorers import PocketScorer
from dreambooth.pocket.settings import DemoConfig
from dreambooth.pocket.world import CONTEXTS


@pytest.fixture(scope="module")
def pocket():
    return load_model("pocket", device="cpu")


def test_committed_cascade_loads_in_stock_if_pipelines(pocket) -> None:
    assert [type(p).__name__ for p in pocket.pipelines] == ["IFPipeline", "IFSuperResolutionPipeline"]
    (image,) = generate(pocket.pipelines, ["a red cube on the beach"], [0], steps=8, guidance=pocket.guidance)
    assert image.size == (64, 64)


def test_pretrained_base_draws_the_prompted_class_and_context(pocket) -> None:
    """A spot check; `dreambooth pocket quality` measures all 60 (class, context) prompts."""
    wanted = [("cube", "beach"), ("ball", "snow"), ("star", "jungle"), ("cup", "grass"), ("bottle", "wooden_floor"),
              ("teddy", "pink_fabric"), ("cube", "city_night"), ("ball", "under_water"), ("star", "brick_wall"),
              ("cup", "mountain"), ("bottle", "snow"), ("teddy", "beach")]
    prompts = [f"a {cls} {CONTEXTS[context]}" for cls, context in wanted]
    images = generate(pocket.pipelines[:1], prompts, list(range(len(prompts))), steps=15, guidance=[4.0], batch_size=12)
    predicted = PocketScorer.load().classify(images)
    assert sum(p == w[0] for p, w in zip(predicted.cls, wanted)) >= 8
    assert sum(p == w[1] for p, w in zip(predicted.context, wanted)) >= 9


def test_a_short_dreambooth_run_learns_the_subject(tmp_path: Path) -> None:
    result = run_demo(DemoConfig(run_dir=tmp_path, base_steps=80, sr_steps=40, num_class_images=16, images_per_prompt=2, sampling_steps=12))
    before, after = result["scores"]["pretrained"], result["scores"]["fine-tuned"]
    assert after["subject_fidelity"] > before["subject_fidelity"] + 0.1
    assert after["subject_recognised"] > before["subject_recognised"] + 0.3
    assert (tmp_path / "contact_sheet.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["identifier"] == result["identifier"]
