"""`dreambooth train` end to end on a tiny Stable Diffusion: outputs, resume, interrupts, bad inputs."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import dreambooth.training.loop as loop
from dreambooth._config_io import from_dict
from dreambooth._config_io import load_file as load_config_file
from dreambooth.cli import main
from dreambooth.config import RunConfig

FAST = [
    "--class-noun", "dog", "--num-class-images", "2", "--class-steps", "2", "--class-batch-size", "2",
    "--validation-every", "0", "--validation-images", "1", "--validation-steps", "2", "--checkpoint-every",
    "2", "--logger", "none", "--learning-rate", "1e-3",
]


def train(model: Path, photos: Path, run_dir: Path, *extra: str) -> int:
    return main([
        "train", "--model", str(model), "--instance-dir", str(photos), "--run-dir", str(run_dir), *FAST,
        *extra,
    ])


def _sample(pipe: StableDiffusionPipeline, prompt: str = "a dog") -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def test_full_finetune_outputs_load_in_stock_diffusers(tiny_sd: Path, photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_sd, photos, run, "--max-steps", "4", "--logger", "tensorboard") == 0

    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    assert _sample(pipe).shape == (32, 32, 3)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert not torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight)  # it trained
    assert torch.equal(pipe.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)  # the VAE did not

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["instance_prompt"] == f"a {info['identifier']} dog"
    assert from_dict(RunConfig, load_config_file(run / "config.resolved.toml")).train.max_steps == 4
    rows = [json.loads(line) for line in (run / "logs" / "base.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("loss/prior" in r for r in rows)
    for produced in (
        "logs/loss-base.png", "samples/base/step-000004.png", "checkpoints/base/latest",
        "class_images/manifest.json",
    ):
        assert (run / produced).is_file(), produced
    assert any((run / "logs" / "tensorboard").rglob("events.out.tfevents.*"))


def test_lora_weights_load_with_load_lora_weights_and_match_the_merged_pipeline(
    tiny_sd: Path, photos: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--train-text-encoder", "--learning-rate", "1e-2"]
    assert train(tiny_sd, photos, run, "--max-steps", "3", *lora) == 0
    weights = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text_encoder.") for k in weights)

    merged = _sample(StableDiffusionPipeline.from_pretrained(run / "pipeline"))
    plain = _sample(StableDiffusionPipeline.from_pretrained(tiny_sd))
    # diffusers' format, and the UIs'
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        with_adapter = StableDiffusionPipeline.from_pretrained(tiny_sd)
        with_adapter.load_lora_weights(str(run / "lora"), weight_name=name)
        # alpha/rank = 2 survives the round trip
        assert np.abs(_sample(with_adapter) - merged).max() < 2e-3, name
    assert np.abs(merged - plain).max() > 1e-3  # the adapter changes the output


def test_single_file_checkpoint_loads_offline_with_a_config_folder(
    tiny_sd: Path, photos: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert train(tiny_sd, photos, run, "--max-steps", "2", "--save-single-file") == 0
    pipe = StableDiffusionPipeline.from_single_file(
        str(run / "model.safetensors"), config=str(run / "pipeline"), local_files_only=True
    )
    folder = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    assert torch.allclose(pipe.unet.conv_in.weight, folder.unet.conv_in.weight.half().float())


def test_resume_after_ctrl_c_reaches_the_uninterrupted_weights(
    tiny_sd: Path, photos: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    assert train(tiny_sd, photos, tmp_path / "straight", "--max-steps", "4") == 0

    calls = {"n": 0}
    real = loop.compute_loss

    def interrupt_on_second_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: finish the step, checkpoint, stop
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", interrupt_on_second_step)
    assert (
        train(tiny_sd, photos, tmp_path / "resumed", "--max-steps", "4", "--checkpoint-every", "100") == 130
    )
    assert (tmp_path / "resumed" / "checkpoints" / "base" / "latest").read_text().strip() == "step-000002"
    monkeypatch.setattr(loop, "compute_loss", real)
    assert (
        train(
            tiny_sd, photos, tmp_path / "resumed", "--max-steps", "4", "--checkpoint-every", "100", "--resume"
        )
        == 0
    )

    straight = load_file(tmp_path / "straight" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = lambda run: [
        json.loads(l)["loss/total"] for l in (run / "logs" / "base.jsonl").read_text().splitlines()
    ]  # noqa: E731,E741
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")

    # resumed with fewer steps than its checkpoint has: nothing trains, the weights stay, and the user is told
    with caplog.at_level(logging.WARNING):
        assert train(tiny_sd, photos, tmp_path / "straight", "--max-steps", "2", "--resume") == 0
    assert "resumed at step 4, past its 2 steps" in caplog.text
    again = load_file(tmp_path / "straight" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(
    tiny_sd, photos, tmp_path, monkeypatch, capsys
) -> None:
    real = loop.compute_loss
    calls = {"n": 0}

    def diverge_at_step_three(*args, **kwargs):
        calls["n"] += 1
        loss, terms = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), terms

    monkeypatch.setattr(loop, "compute_loss", diverge_at_step_three)
    assert train(tiny_sd, photos, tmp_path / "run", "--max-steps", "4") == 3
    assert "loss became nan at step 3" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "base" / "latest").read_text().strip() == "step-000002"
    assert not (tmp_path / "run" / "pipeline").exists()


def test_an_existing_run_folder_is_not_clobbered(tiny_sd: Path, photos: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert train(tiny_sd, photos, run, "--max-steps", "2") == 0
    assert train(tiny_sd, photos, run, "--max-steps", "2") == 2
    assert "already exists with checkpoints up to step-000002" in capsys.readouterr().err
    assert train(tiny_sd, photos, run, "--max-steps", "2", "--overwrite") == 0


@pytest.mark.parametrize("options", [
    ["--use-8bit-adam"],
    ["--mixed-precision", "bf16", "--gradient-checkpointing", "--gradient-accumulation-steps", "2"],
    ["--random-flip", "--no-prior-preservation", "--ema-decay", "0.9"],
])
def test_memory_and_speed_options_train(
    tiny_sd: Path, photos: Path, tmp_path: Path, options: list[str]
) -> None:
    assert train(tiny_sd, photos, tmp_path / "run", "--max-steps", "2", *options) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.unet.dtype == torch.float32 and np.isfinite(_sample(pipe)).all()


def test_generate_writes_images_a_grid_and_fills_in_the_identifier(tiny_sd, photos, tmp_path) -> None:
    run = tmp_path / "run"
    assert train(tiny_sd, photos, run, "--max-steps", "1", "--identifier", "xon") == 0
    out = tmp_path / "samples"
    assert (
        main([
            "generate", "--model", str(run), "--prompt", "a [V] dog on the beach", "--prompt", "a dog",
            "--num-images", "2", "--steps", "2", "--out", str(out),
        ])
        == 0
    )
    assert sorted(p.name for p in out.glob("*.png")) == [
        "000-0.png", "000-1.png", "001-0.png", "001-1.png", "grid.png",
    ]
    assert (out / "prompts.txt").read_text().splitlines() == ["a xon dog on the beach", "a dog"]


def test_resolution_sets_the_training_and_sampling_size(tiny_sd: Path, photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        train(tiny_sd, photos, run, "--max-steps", "1", "--resolution", "48", "--validation-every", "1") == 0
    )
    assert Image.open(run / "class_images" / "00000.png").size == (48, 48)
    assert Image.open(run / "samples" / "base" / "step-000001.png").size[1] >= 48
    pipe = StableDiffusionPipeline.from_pretrained(
        run / "pipeline", safety_checker=None, requires_safety_checker=False
    )
    # the exported default
    assert pipe("a dog", num_inference_steps=1, output_type="np").images[0].shape == (48, 48, 3)
