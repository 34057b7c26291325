"""Class images: generated once with a manifest, reused, completed exactly, never mixed up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import dreambooth.prior as prior
from dreambooth.models.sd import load_sd
from dreambooth.prior import MANIFEST, ClassImageSpec, ensure_class_images, model_fingerprint


@pytest.fixture
def setup(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch):
    stage = load_sd(str(tiny_sd))[0]
    spec = ClassImageSpec(model_fingerprint(stage.denoiser), "a dog", stage.resolution, "dpm++", 2, (7.5,))
    generated: list[int] = []
    real_generate = prior.generate

    def counting_generate(pipelines, prompts, seeds, **kwargs):
        generated.extend(seeds)
        return real_generate(pipelines, prompts, seeds, **kwargs)

    monkeypatch.setattr(prior, "generate", counting_generate)
    return [stage.pipeline], spec, generated


def test_generated_once_then_reused(setup, tmp_path: Path) -> None:
    pipeline, spec, generated = setup
    first = ensure_class_images(pipeline, tmp_path, spec, 3, seed=10, batch_size=2)
    assert generated == [10, 11, 12]
    second = ensure_class_images(pipeline, tmp_path, spec, 3, seed=10, batch_size=2)
    assert second == first and generated == [10, 11, 12]  # nothing generated the second time
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    record = manifest["images"][1]
    assert {k: record[k] for k in ("prompt", "seed", "sampler", "steps", "guidance")} == {
        "prompt": "a dog", "seed": 11, "sampler": "dpm++", "steps": 2, "guidance": [7.5],
    }


def test_only_missing_or_damaged_images_are_made_again_identically(setup, tmp_path: Path) -> None:
    pipeline, spec, generated = setup
    paths = ensure_class_images(pipeline, tmp_path, spec, 3, seed=0, batch_size=3)
    original = paths[1].read_bytes()
    paths[1].unlink()
    paths[2].write_bytes(b"damaged")
    ensure_class_images(pipeline, tmp_path, spec, 4, seed=0, batch_size=3)
    assert generated == [0, 1, 2, 1, 2, 3]
    assert paths[1].read_bytes() == original  # image i always comes from seed + i


@pytest.mark.parametrize("change", [{"prompt": "a cat"}, {"model": "another-model"}, {"steps": 50}])
def test_a_set_made_differently_is_detected(setup, tmp_path: Path, change: dict) -> None:
    pipeline, spec, _ = setup
    ensure_class_images(pipeline, tmp_path, spec, 1, seed=0, batch_size=1)
    with pytest.raises(ValueError, match="were made differently"):
        ensure_class_images(pipeline, tmp_path, dataclasses.replace(spec, **change), 1, seed=0, batch_size=1)


def test_images_of_unknown_origin_are_not_used_silently(setup, tmp_path: Path) -> None:
    pipeline, spec, _ = setup
    (tmp_path / "someone_elses.png").write_bytes(b"")
    with pytest.raises(ValueError, match="without a manifest.json"):
        ensure_class_images(pipeline, tmp_path, spec, 1, seed=0, batch_size=1)


def test_fingerprint_changes_with_the_weights(tiny_sd: Path) -> None:
    unet = load_sd(str(tiny_sd))[0].denoiser
    before = model_fingerprint(unet)
    with __import__("torch").no_grad():
        next(unet.parameters()).add_(1.0)
    assert model_fingerprint(unet) != before
