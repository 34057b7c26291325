"""Class images: generated once with a manifest, reused, completed exactly, never mixed up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import dreambooth.prior as prior
from dreambooth.config import LoraConfig
from dreambooth.models.lora import add_lora, merge_lora
from dreambooth.models.sd import load_sd
from dreambooth.prior import (
    MANIFEST,
    ClassImageSpec,
    class_image_paths,
    ensure_class_images,
    generate_class_images,
    model_fingerprint,
    record_class_images,
)


@pytest.fixture
def setup(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch):
    stage = load_sd(str(tiny_sd))[0]
    spec = ClassImageSpec(
        model=model_fingerprint(stage.pipeline), prompt="a dog", prompt_tokenized="a dog",
        resolution=stage.resolution, sampler="dpm++", steps=2, guidance=(7.5,), seed=0,
    )
    generated: list[int] = []
    real_generate = prior.generate

    def counting_generate(pipelines, prompts, seeds, **kwargs):
        generated.extend(seeds)
        return real_generate(pipelines, prompts, seeds, **kwargs)

    monkeypatch.setattr(prior, "generate", counting_generate)
    return [stage.pipeline], spec, generated


def test_generated_once_then_reused(setup, tmp_path: Path) -> None:
    pipeline, spec, generated = setup
    spec = dataclasses.replace(spec, seed=10)
    first = ensure_class_images(pipeline, tmp_path, spec, 3, batch_size=2)
    assert generated == [10, 11, 12]
    second = ensure_class_images(pipeline, tmp_path, spec, 3, batch_size=2)
    assert second == first and generated == [10, 11, 12]  # nothing generated the second time
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    record = manifest["images"][1]
    assert {k: record[k] for k in ("prompt", "seed", "sampler", "steps", "guidance")} == {
        "prompt": "a dog", "seed": 11, "sampler": "dpm++", "steps": 2, "guidance": [7.5],
    }
    # no part files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png", "00002.png", MANIFEST]


def test_only_missing_or_damaged_images_are_made_again_identically(setup, tmp_path: Path) -> None:
    pipeline, spec, generated = setup
    paths = ensure_class_images(pipeline, tmp_path, spec, 3, batch_size=3)
    original = paths[1].read_bytes()
    paths[1].unlink()
    paths[2].write_bytes(b"damaged")
    kept = paths[0].stat().st_mtime_ns
    ensure_class_images(pipeline, tmp_path, spec, 4, batch_size=3)
    # the batch of images 1 and 2 is sampled whole, image 3 in its own
    assert generated == [0, 1, 2, 0, 1, 2, 3]
    assert paths[1].read_bytes() == original  # image i always comes from seed + i, in the same batch
    assert paths[0].stat().st_mtime_ns == kept  # an intact image is not rewritten


@pytest.mark.parametrize("change", [
    {"prompt": "a cat"}, {"model": "another-model"}, {"steps": 50}, {"prompt_tokenized": "A dog"},
    {"precision": "bf16"},
])
def test_a_set_made_differently_is_detected(setup, tmp_path: Path, change: dict) -> None:
    pipeline, spec, _ = setup
    ensure_class_images(pipeline, tmp_path, spec, 1, batch_size=1)
    with pytest.raises(ValueError, match="were made differently"):
        ensure_class_images(pipeline, tmp_path, dataclasses.replace(spec, **change), 1, batch_size=1)


def test_fp32_sets_keep_the_manifest_of_before_precision_was_recorded(setup, tmp_path: Path) -> None:
    pipeline, spec, generated = setup
    ensure_class_images(pipeline, tmp_path, spec, 1, batch_size=1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert "precision" not in manifest["spec"]  # fp32 sets made before this field existed stay valid
    ensure_class_images(pipeline, tmp_path, spec, 1, batch_size=1)
    assert generated == [0]


def test_a_changed_seed_is_refused(setup, tmp_path: Path) -> None:
    pipeline, spec, generated = setup
    ensure_class_images(pipeline, tmp_path, spec, 2, batch_size=2)
    with pytest.raises(ValueError, match=r"made differently \(seed: 0 there, 5 now\)"):
        ensure_class_images(pipeline, tmp_path, dataclasses.replace(spec, seed=5), 2, batch_size=2)
    assert generated == [0, 1]


def test_a_manifest_of_an_earlier_version_is_refused_clearly(setup, tmp_path: Path) -> None:
    pipeline, spec, _ = setup
    ensure_class_images(pipeline, tmp_path, spec, 1, batch_size=1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    for key in ("seed", "prompt_tokenized"):
        del manifest["spec"][key]
    manifest["spec"]["model"] = "0123abcd"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match="seed: not recorded there, 0 now.*An earlier version of this tool made them"
    ) as error:
        ensure_class_images(pipeline, tmp_path, spec, 1, batch_size=1)
    assert "model: '0123abcd' there" in str(error.value) and "delete that folder to regenerate" in str(
        error.value
    )


def test_images_of_unknown_origin_are_not_used_silently(setup, tmp_path: Path) -> None:
    pipeline, spec, _ = setup
    (tmp_path / "someone_elses.png").write_bytes(b"")
    with pytest.raises(ValueError, match="without a manifest.json"):
        ensure_class_images(pipeline, tmp_path, spec, 1, batch_size=1)


def test_two_processes_share_the_work_and_make_the_same_images(setup, tmp_path: Path) -> None:
    pipeline, spec, generated = setup
    one = ensure_class_images(pipeline, tmp_path / "one", spec, 5, batch_size=2)
    generated.clear()
    two = tmp_path / "two"
    generate_class_images(pipeline, two, spec, 5, batch_size=2, rank=1, num_ranks=2)
    assert generated == [2, 3] and not (two / MANIFEST).exists()  # process 1 samples the second batch
    generate_class_images(pipeline, two, spec, 5, batch_size=2, rank=0, num_ranks=2)
    assert generated == [2, 3, 0, 1, 4]
    assert len(list(two.glob(prior.PARTS))) == 2  # each process wrote only its own records
    paths = record_class_images(two, spec, 5)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in one]
    assert class_image_paths(two, spec, 5) == paths and not list(two.glob(prior.PARTS))
    assert json.loads((two / MANIFEST).read_text()) == json.loads((tmp_path / "one" / MANIFEST).read_text())


def test_a_run_killed_midway_is_completed_by_the_next(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, spec, generated = setup
    counting_generate = prior.generate

    def dying_generate(*args, **kwargs):
        if generated:
            raise KeyboardInterrupt
        return counting_generate(*args, **kwargs)

    monkeypatch.setattr(prior, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):  # dies in its second batch, before any manifest
        generate_class_images(pipeline, tmp_path / "killed", spec, 6, batch_size=2)
    assert (
        not (tmp_path / "killed" / MANIFEST).exists() and len(list((tmp_path / "killed").glob("*.png"))) == 2
    )
    monkeypatch.setattr(prior, "generate", counting_generate)
    generated.clear()
    generate_class_images(pipeline, tmp_path / "killed", spec, 6, batch_size=2, rank=0, num_ranks=2)
    generate_class_images(pipeline, tmp_path / "killed", spec, 6, batch_size=2, rank=1, num_ranks=2)
    assert generated == [4, 5, 2, 3]
    completed = record_class_images(tmp_path / "killed", spec, 6)
    uninterrupted = ensure_class_images(pipeline, tmp_path / "whole", spec, 6, batch_size=2)
    assert [p.read_bytes() for p in completed] == [p.read_bytes() for p in uninterrupted]


def test_fingerprint_is_stable_across_loads(tiny_sd: Path) -> None:
    assert model_fingerprint(load_sd(str(tiny_sd))[0].pipeline) == model_fingerprint(
        load_sd(str(tiny_sd))[0].pipeline
    )


def test_fingerprint_changes_with_one_text_encoder_weight(tiny_sd: Path) -> None:
    pipeline = load_sd(str(tiny_sd))[0].pipeline
    before = model_fingerprint(pipeline)
    weight = next(
        w for name, w in pipeline.text_encoder.named_parameters()
        if name.endswith("layers.0.self_attn.q_proj.weight")
    )
    with torch.no_grad():
        # the smallest change a float32 can make
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(1.0))
    assert model_fingerprint(pipeline) != before


def test_fingerprint_changes_when_a_lora_is_merged(tiny_sd: Path) -> None:
    stage = load_sd(str(tiny_sd))[0]
    before = model_fingerprint(stage.pipeline)
    add_lora(stage, LoraConfig(rank=2), {"unet": stage.denoiser})
    with torch.no_grad():
        for name, param in stage.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
    merge_lora(stage)
    assert model_fingerprint(stage.pipeline) != before
