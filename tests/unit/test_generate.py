"""Sampling: per-image seeds, and cascades that share stages sample them once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from dreambooth.config import LoraConfig
from dreambooth.generate import check_generate, generate, generate_cascades, load_model
from dreambooth.models.deepfloyd_if import load_if
from dreambooth.models.lora import add_lora, has_lora, save_lora
from dreambooth.models.sdxl import load_sdxl


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_cascades_sharing_a_base_match_separate_runs_and_sample_it_once(tiny_cascade: Path) -> None:
    base, sr = (s.pipeline for s in load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2")))
    _, other_sr = (s.pipeline for s in load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2")))
    other_sr.unet.conv_in.weight.data.add_(0.5)  # a different SR stage after the same base
    prompts, seeds = ["a cube", "a ball", "a cube"], [0, 1, 2]
    kwargs = dict(steps=2, guidance=[4.0, 4.0], batch_size=2)

    separately = {
        name: generate(c, prompts, seeds, **kwargs)
        for name, c in (("a", [base, sr]), ("b", [base, other_sr]))
    }
    base_calls: list = []
    original = type(base).__call__
    type(base).__call__ = _counting(original, base_calls)
    try:
        together = generate_cascades({"a": [base, sr], "b": [base, other_sr]}, prompts, seeds, **kwargs)
    finally:
        type(base).__call__ = original

    assert len(base_calls) == 2  # one call per batch of 2, shared by both cascades
    for name in ("a", "b"):
        np.testing.assert_array_equal(_pixels(together[name]), _pixels(separately[name]))
    assert not np.array_equal(_pixels(together["a"]), _pixels(together["b"]))


def test_an_image_depends_on_its_seed_not_its_batch(tiny_cascade: Path) -> None:
    pipelines = [s.pipeline for s in load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2"))]
    alone = generate(pipelines, ["a cube"], [5], steps=2, guidance=[4.0, 4.0])
    batched = generate(pipelines, ["a ball", "a cube"], [4, 5], steps=2, guidance=[4.0, 4.0], batch_size=2)
    # uint8; batched matmuls may round differently
    np.testing.assert_allclose(_pixels(alone)[0], _pixels(batched)[1], atol=2)


@pytest.mark.parametrize("adapted", ["unet", "text_encoder"])
def test_an_adapter_loads_with_no_warning_about_the_components_it_leaves_alone(
    tiny_sdxl: Path, tmp_path: Path, caplog, adapted: str
) -> None:
    """diffusers warns "No LoRA keys associated to CLIPTextModel... open an issue" for each text encoder an
    adapter leaves alone, as every LoRA run that does not train them writes it: not shown. An adapter that
    leaves the denoiser alone is unusual: its warning stays."""
    (stage,) = load_sdxl(str(tiny_sdxl))
    component = getattr(stage.pipeline, adapted)
    add_lora(stage, LoraConfig(rank=4), {adapted: component})
    lora = save_lora(stage, tmp_path / "lora")

    with caplog.at_level(logging.WARNING):
        model = load_model(str(tiny_sdxl), lora=str(lora.parent), device="cpu")

    assert has_lora(getattr(model.pipelines[0], adapted))
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("No LoRA keys")]
    if adapted == "unet":
        assert warnings == []
    else:
        assert len(warnings) == 1 and "UNet2DConditionModel" in warnings[0]


@pytest.mark.parametrize(
    ("prompt", "warns"),
    [
        ("a dog in a bath", True), ("a fepx dog", True), ("a [V] dog", False),
        ("a fep dog, oil painting", False),
    ],
)
def test_sampling_a_run_with_prompts_that_never_name_its_subject_warns(
    tiny_sd: Path, tmp_path: Path, caplog, prompt: str, warns: bool
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps({"identifier": "fep", "class_noun": "dog", "model": {"source": str(tiny_sd)}})
    )
    with caplog.at_level(logging.WARNING):
        check_generate(str(run), [prompt, "a photo of a dog"], tmp_path / "out")
    assert ("no prompt names the subject" in caplog.text) == warns


def test_a_run_folder_with_a_damaged_run_json_is_named(tiny_sd: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline").symlink_to(tiny_sd)
    (run / "run.json").write_text('{"identifier": "fe')
    with pytest.raises(ValueError, match=r"run\.json' is damaged .*pass the run's pipeline/ folder"):
        check_generate(str(run), ["a [V] dog"], tmp_path / "out")


def _counting(function, calls: list):
    def counted(self, *args, **kwargs):
        calls.append(1)
        return function(self, *args, **kwargs)

    return counted
