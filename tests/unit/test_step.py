"""The training step and its batches, on a tiny Stable Diffusion model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth.data.training_set import TrainingSet, encode_captions, encode_examples, sample_batch
from dreambooth.models.ddpm import training_target
from dreambooth.models.sd import load_sd
from dreambooth.seeding import RowRandom
from dreambooth.training.step import compute_loss

from conftest import overfit


def _data(stage, photos: Path, with_classes: bool = True) -> TrainingSet:
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    instance = encode_examples(stage, images, ["a xon dog"] * len(images))
    classes = encode_examples(stage, images[::-1], ["a dog"] * len(images)) if with_classes else None
    return TrainingSet(instance, classes, encode_captions(stage, ["a xon dog", "a dog"]))


def _batch(data, stage, **kwargs):
    defaults = dict(step=0, micro=0, accumulation=1, rank=0, world=1, batch_size=2, seed=0)
    return sample_batch(data, stage.tokenize, **{**defaults, **kwargs})


def test_loss_falls_when_overfitting_one_batch(tiny_sd: Path, photos: Path) -> None:
    stage = load_sd(str(tiny_sd))[0]
    batch = _batch(_data(stage, photos), stage)
    losses, _ = overfit(stage, batch, (stage.denoiser,), steps=40, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_prior_term_is_weighted_and_split_by_rows(tiny_sd: Path, photos: Path) -> None:
    stage = load_sd(str(tiny_sd))[0]
    batch = _batch(_data(stage, photos), stage)
    with torch.no_grad():
        loss, terms = compute_loss(stage, batch, prior_weight=0.5)
    assert terms["loss/instance"].shape == (2,) and terms["loss/prior"].shape == (2,)
    expected = terms["loss/instance"].mean() + 0.5 * terms["loss/prior"].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
def test_target_follows_the_schedulers_parameterisation(
    fixture: str, request, photos: Path, monkeypatch
) -> None:
    """A denoiser that outputs the true target gets zero loss: epsilon for SD 1.x, v for SD 2.x."""
    stage = load_sd(str(request.getfixturevalue(fixture)))[0]
    kind = stage.objective.prediction_type
    assert kind == ("epsilon" if fixture == "tiny_sd" else "v_prediction")
    batch = _batch(_data(stage, photos, with_classes=False), stage)

    def perfect(noisy, t, text, encoded, rng):
        replay = RowRandom(batch.seeds)  # the step's own draws, in the step's order
        x0 = stage.sample_x0(encoded, replay)
        noise = replay.randn(tuple(x0.shape[1:]))
        alpha_bar = stage.objective.scheduler.alphas_cumprod[t][:, None, None, None]
        assert torch.allclose(noisy, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, atol=1e-5)
        return noise if kind == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0

    monkeypatch.setattr(stage, "predict", perfect)
    with torch.no_grad():
        loss, _ = compute_loss(stage, batch, prior_weight=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)


def test_unknown_parameterisation_is_refused(tiny_sd: Path) -> None:
    stage = load_sd(str(tiny_sd))[0]
    stage.objective.scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'"):
        training_target(
            stage.objective.scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long)
        )


def test_batches_are_the_same_however_the_global_batch_is_split(tiny_sd: Path, photos: Path) -> None:
    """Two processes of batch 1 see exactly the rows (and seeds) of one process of batch 2."""
    stage = load_sd(str(tiny_sd))[0]
    data = _data(stage, photos)
    whole = _batch(data, stage, step=3, batch_size=2, world=1)
    halves = [_batch(data, stage, step=3, batch_size=1, world=2, rank=r) for r in (0, 1)]
    assert whole.seeds == [halves[0].seeds[0], halves[1].seeds[0], halves[0].seeds[1], halves[1].seeds[1]]
    for key, value in whole.encoded.items():
        rows = torch.cat([
            halves[0].encoded[key][:1], halves[1].encoded[key][:1], halves[0].encoded[key][1:],
            halves[1].encoded[key][1:],
        ])
        assert torch.equal(value, rows)


def test_every_photo_is_seen_once_per_epoch(tiny_sd: Path, photos: Path) -> None:
    stage = load_sd(str(tiny_sd))[0]
    data = _data(stage, photos, with_classes=False)
    n = len(data.instance)
    seen = [
        tuple(_batch(data, stage, step=s, batch_size=1).encoded["latent_mean"][0].flatten()[:4].tolist())
        for s in range(n)
    ]
    assert len(set(seen)) == n


def test_mixed_precision_casts_say_nothing_when_no_module_must_stay_fp32(tiny_sd: Path, caplog) -> None:
    """diffusers warns on every dtype cast of its models that fp32 modules may be lost, even for models
    that keep none in fp32 (every family here): a bf16 run must not print that to its user."""
    from diffusers import UNet2DConditionModel

    from dreambooth.training.loop import _store_frozen

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    with caplog.at_level(logging.WARNING):
        _store_frozen(unet, torch.device("cpu"), torch.bfloat16)
    assert next(unet.parameters()).dtype == torch.bfloat16
    assert "float32" not in caplog.text
