"""The third stage of an IF cascade, the Stable Diffusion x4 upscaler (256 -> 1024 px in IF; 32 -> 128
here)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

from dreambooth.cli import main
from dreambooth.data.training_set import TrainingSet, encode_examples, sample_batch
from dreambooth.models._lowres import downsample
from dreambooth.models.sd_upscaler import NOISE_LEVEL, load_upscaler
from dreambooth.training.step import compute_loss

from conftest import record_unet_inputs

FAST = [
    "--class-noun", "dog", "--max-steps", "2", "--sr-max-steps", "2", "--num-class-images", "2",
    "--class-steps", "2", "--validation-every", "0", "--validation-images", "1", "--validation-steps", "2",
    "--logger", "none",
]


def test_upscaler_trains_on_the_inputs_it_samples_with(tiny_if_x4: Path, photos: Path) -> None:
    """Training feeds [noisy latents, the photo's noise-augmented low-res view] with the augmentation level as
    class_labels, as StableDiffusionUpscalePipeline does at the level the cascade samples at."""
    stage = load_upscaler(str(tiny_if_x4 / "stage_3"), low_resolution=32)
    stage.noise_level_range = (NOISE_LEVEL, NOISE_LEVEL)
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    data = TrainingSet(encode_examples(stage, images, ["a xon dog"] * len(images)))
    batch = sample_batch(
        data, stage.tokenize, step=0, micro=0, accumulation=1, rank=0, world=1, batch_size=2, seed=0
    )
    pixels = torch.rand(1, 3, 128, 128) * 2 - 1
    # the photo at the input size
    assert torch.equal(stage.encode_images(pixels, torch.zeros(1, 4))["lowres"], downsample(pixels, 32))

    training: list = []
    record_unet_inputs(stage.denoiser, training)
    with torch.no_grad():
        compute_loss(stage, batch, prior_weight=0.0)
    (train,) = training
    assert train["sample"].shape == (2, 7, 32, 32) and train["class_labels"].tolist() == [NOISE_LEVEL] * 2

    sampling: list = []
    pipeline = StableDiffusionUpscalePipeline.from_pretrained(
        tiny_if_x4 / "stage_3", safety_checker=None, feature_extractor=None, watermarker=None
    )
    record_unet_inputs(pipeline.unet, sampling)
    lowres = batch.encoded["lowres"] / 2 + 0.5
    pipeline(
        prompt=["a xon dog"] * 2, image=lowres, num_inference_steps=1, noise_level=NOISE_LEVEL,
        guidance_scale=1.0, output_type="pt",
    )
    assert sampling[0]["sample"].shape == train["sample"].shape
    assert sampling[0]["class_labels"].tolist() == train["class_labels"].tolist()
    # The conditioning channels are the same image under noise of the same level: equal statistics.
    assert abs(sampling[0]["sample"][:, 4:].std() - train["sample"][:, 4:].std()) < 0.15


def test_the_third_stage_fine_tunes_and_the_cascade_samples_through_it(
    tiny_if_x4: Path, photos: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = [
        "train", "--model", str(tiny_if_x4), "--instance-dir", str(photos), "--run-dir", str(run), *FAST,
        "--stages", "upscaler",
    ]
    assert main(argv) == 0
    assert (run / "checkpoints" / "upscaler" / "latest").is_file() and not (
        run / "checkpoints" / "base"
    ).exists()
    # the whole frozen cascade's
    assert Image.open(run / "class_images" / "upscaler" / "00000.png").size == (128, 128)
    tuned = StableDiffusionUpscalePipeline.from_pretrained(
        run / "pipeline" / "stage_3", safety_checker=None, feature_extractor=None, watermarker=None
    )
    original = StableDiffusionUpscalePipeline.from_pretrained(
        tiny_if_x4 / "stage_3", safety_checker=None, feature_extractor=None, watermarker=None
    )
    assert not torch.equal(tuned.unet.conv_in.weight, original.unet.conv_in.weight)

    out = tmp_path / "samples"
    assert (
        main([
            "generate", "--model", str(run), "--prompt", "a [V] dog", "--num-images", "1", "--steps", "2",
            "--out", str(out),
        ])
        == 0
    )
    assert Image.open(out / "000-0.png").size == (128, 128)


def test_asking_for_a_stage_the_cascade_lacks_is_an_error_before_loading(
    tiny_if: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    argv = [
        "train", "--model", str(tiny_if), "--instance-dir", str(photos), "--run-dir", str(run), *FAST,
        "--stages", "base", "upscaler",
    ]
    assert main(argv) == 2
    assert "--upscaler-model" in capsys.readouterr().err and not run.exists()
