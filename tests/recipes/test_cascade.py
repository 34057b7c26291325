"""Cascades (IF format): both stages fine-tune, reload in stock IF pipelines, and SR trains as it samples."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import IFPipeline, IFSuperResolutionPipeline
from PIL import Image

from dreambooth.cli import main
from dreambooth.data.training_set import TrainingSet, encode_examples, sample_batch
from dreambooth.files import read_json
from dreambooth.models.deepfloyd_if import downsample, load_if, upscale
from dreambooth.prior import model_fingerprint
from dreambooth.training.step import compute_loss

from conftest import record_unet_inputs

FAST = [
    "--class-noun", "cube", "--max-steps", "2", "--sr-max-steps", "2", "--num-class-images", "2",
    "--class-steps", "2", "--validation-every", "0", "--validation-images", "1", "--validation-steps", "2",
    "--logger", "none",
]


def test_both_stages_fine_tune_and_reload_in_stock_if_pipelines(
    tiny_cascade: Path, photos: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert (
        main([
            "train", "--model", str(tiny_cascade), "--instance-dir", str(photos), "--run-dir", str(run),
            *FAST,
        ])
        == 0
    )
    for stage in ("base", "sr"):
        assert (run / "checkpoints" / stage / "latest").is_file()
        assert (run / "samples" / stage / "step-000002.png").is_file()
    # Prior preservation for both stages: one set of class images, the frozen cascade's outputs.
    assert Image.open(run / "class_images" / "sr" / "00000.png").size == (32, 32)
    assert not list((run / "class_images").glob("*.png"))
    frozen = load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2"))
    manifest = read_json(run / "class_images" / "sr" / "manifest.json")
    # not the fine-tuned base's
    assert manifest["spec"]["model"] == model_fingerprint(*(s.pipeline for s in frozen))
    base = IFPipeline.from_pretrained(
        run / "pipeline" / "stage_1", safety_checker=None, watermarker=None, feature_extractor=None
    )
    sr = IFSuperResolutionPipeline.from_pretrained(
        run / "pipeline" / "stage_2", safety_checker=None, watermarker=None, feature_extractor=None
    )
    low = base("a cube", num_inference_steps=2, output_type="pt", clean_caption=False).images
    high = sr(image=low, prompt="a cube", num_inference_steps=2, output_type="np", clean_caption=False).images
    assert low.shape == (1, 3, 16, 16) and high.shape == (1, 32, 32, 3)

    original = IFSuperResolutionPipeline.from_pretrained(
        tiny_cascade / "stage_2", safety_checker=None, watermarker=None, feature_extractor=None
    )
    # personalised SR: the SR stage trained
    assert not torch.equal(sr.unet.conv_in.weight, original.unet.conv_in.weight)

    out = tmp_path / "samples"
    assert (
        main([
            "generate", "--model", str(run), "--prompt", "a [V] cube", "--num-images", "1", "--steps", "2",
            "--out", str(out),
        ])
        == 0
    )
    assert Image.open(out / "000-0.png").size == (32, 32)


def test_only_the_requested_stages_train(tiny_cascade: Path, photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        main([
            "train", "--model", str(tiny_cascade), "--instance-dir", str(photos), "--run-dir", str(run),
            *FAST, "--stages", "sr",
        ])
        == 0
    )
    assert (run / "checkpoints" / "sr").is_dir() and not (run / "checkpoints" / "base").exists()
    # the untrained base still ships: a complete cascade
    assert (run / "pipeline" / "stage_1" / "model_index.json").is_file()


def _noise_of(model_input: torch.Tensor, lowres: torch.Tensor, level: int, scheduler) -> torch.Tensor:
    """The noise that would turn upscale(lowres) into the low-res half of a UNet input at `level`."""
    alpha_bar = scheduler.alphas_cumprod[level]
    return (model_input[:, 3:] - alpha_bar.sqrt() * upscale(lowres, model_input.shape[-1])) / (
        1 - alpha_bar
    ).sqrt()


def test_super_resolution_trains_on_the_inputs_it_samples_with(tiny_cascade: Path, photos: Path) -> None:
    """The SR UNet sees, in training as in IFSuperResolutionPipeline: the noisy high-res image, then the real
    low-res image upscaled and noise-augmented at level L, with L (not the timestep) as class_labels.
    A trainer that concatenates the noisy target with itself, or conditions on the timestep, fails here."""
    level = 250
    _, sr = load_if(
        str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2"), noise_level_range=(level, level)
    )
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    data = TrainingSet(encode_examples(sr, images, ["a xon cube"] * len(images)))
    batch = sample_batch(
        data, sr.tokenize, step=0, micro=0, accumulation=1, rank=0, world=1, batch_size=4, seed=0
    )

    training_calls: list = []
    record_unet_inputs(sr.denoiser, training_calls)
    with torch.no_grad():
        compute_loss(sr, batch, prior_weight=0.0)
    (train,) = training_calls
    lowres = batch.encoded["lowres"]
    # the real photo, seen at the base resolution
    assert torch.equal(lowres, downsample(batch.encoded["pixels"], 16))
    assert train["sample"].shape[1] == 6
    assert torch.equal(train["class_labels"], torch.full((4,), level))
    assert not torch.equal(train["t"], train["class_labels"])
    train_noise = _noise_of(train["sample"], lowres, level, sr.pipeline.image_noising_scheduler)
    assert abs(train_noise.mean().item()) < 0.1 and abs(train_noise.std().item() - 1) < 0.1
    assert not torch.allclose(train["sample"][:, 3:], train["sample"][:, :3])

    sampling_calls: list = []
    pipeline = IFSuperResolutionPipeline.from_pretrained(
        tiny_cascade / "stage_2", safety_checker=None, watermarker=None, feature_extractor=None
    )
    record_unet_inputs(pipeline.unet, sampling_calls)
    pipeline(
        image=lowres, prompt=["a xon cube"] * 4, num_inference_steps=1, noise_level=level, guidance_scale=1.0,
        clean_caption=False, output_type="pt",
    )
    sample = sampling_calls[0]
    assert sample["sample"].shape == train["sample"].shape
    assert torch.equal(sample["class_labels"], train["class_labels"])
    sample_noise = _noise_of(sample["sample"], lowres, level, pipeline.image_noising_scheduler)
    assert abs(sample_noise.mean().item()) < 0.1 and abs(sample_noise.std().item() - 1) < 0.1
