"""`dreambooth train` on a tiny SDXL: both text encoders, micro-conditioning, full and LoRA runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.data.training_set import TrainingSet, encode_captions, encode_examples, sample_batch
from dreambooth.models.sdxl import load_sdxl
from dreambooth.training.step import compute_loss

from conftest import overfit

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


def _sample(pipe: StableDiffusionXLPipeline, prompt: str = "a dog") -> np.ndarray:
    return pipe(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]


def _photos(folder: Path, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_time_ids_follow_each_photos_size_and_crop(tiny_sdxl: Path, tmp_path: Path) -> None:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) of each photo, flips
    mirrored."""
    (stage,) = load_sdxl(str(tiny_sdxl))
    images = _photos(tmp_path, [(128, 64), (64, 96), (64, 64)])  # (w, h): landscape, portrait, square
    examples = encode_examples(stage, images, ["a xon dog"] * 3, flip=True)
    ids = examples.encoded["time_ids"].tolist()
    assert ids[:3] == [[64, 128, 0, 32, 64, 64], [96, 64, 16, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert ids[3:] == ids[:3]  # a centre crop mirrored is the same crop


def test_loss_falls_on_a_fixed_batch_with_both_text_encoders_training(tiny_sdxl: Path, photos: Path) -> None:
    (stage,) = load_sdxl(str(tiny_sdxl))
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    data = TrainingSet(
        encode_examples(stage, images, ["a xon dog"] * 4), encode_examples(stage, images[::-1], ["a dog"] * 4)
    )
    batch = sample_batch(
        data, stage.tokenize, step=0, micro=0, accumulation=1, rank=0, world=1, batch_size=2, seed=0
    )
    losses, terms = overfit(stage, batch, (stage.denoiser, *stage.text_encoders.values()), steps=30, lr=2e-3)
    assert terms["loss/instance"].shape == (2,) and terms["loss/prior"].shape == (2,)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_cached_text_equals_what_the_encoders_give_in_the_step(tiny_sdxl: Path, photos: Path) -> None:
    """The text cache (frozen encoders) and the live encoders give the step the same conditioning."""
    (stage,) = load_sdxl(str(tiny_sdxl))
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    instance = encode_examples(stage, images, ["a xon dog"] * 4)
    kwargs = dict(step=0, micro=0, accumulation=1, rank=0, world=1, batch_size=2, seed=0)
    cached = sample_batch(
        TrainingSet(instance, text_cache=encode_captions(stage, instance.captions)), stage.tokenize, **kwargs
    )
    live = sample_batch(TrainingSet(instance), stage.tokenize, **kwargs)
    with torch.no_grad():
        a, _ = compute_loss(stage, cached, prior_weight=1.0)
        b, _ = compute_loss(stage, live, prior_weight=1.0)
    assert cached.text.sequence.shape == (2, 77, 80) and cached.text.pooled.shape == (2, 24)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_full_finetune_of_unet_and_both_text_encoders_loads_in_stock_diffusers(
    tiny_sdxl: Path, photos: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert (
        train(
            tiny_sdxl, photos, run, "--max-steps", "2", "--train-text-encoder",
            "--text-encoder-2-learning-rate", "1e-4",
        )
        == 0
    )
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["family"] == "sdxl" and info["status"] == "done"
    identifier = info["identifier"]
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for tokenizer in (base.tokenizer, base.tokenizer_2):  # one rare token in each vocabulary
        assert len(tokenizer(f"a {identifier} dog").input_ids) == len(tokenizer("a dog").input_ids) + 1
    pipe = StableDiffusionXLPipeline.from_pretrained(run / "pipeline")
    assert _sample(pipe).shape == (64, 64, 3)
    for name in ("unet", "text_encoder", "text_encoder_2"):  # all three trained
        trained, original = getattr(pipe, name), getattr(base, name)
        assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters())), name
    assert torch.equal(pipe.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)


def test_lora_run_reloads_with_load_lora_weights_and_resumes(
    tiny_sdxl: Path, photos: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    lora = [
        "--lora-rank", "4", "--train-text-encoder", "--text-encoders", "text_encoder_2", "--learning-rate",
        "1e-2",
    ]
    assert train(tiny_sdxl, photos, run, "--max-steps", "2", *lora) == 0
    assert train(tiny_sdxl, photos, run, "--max-steps", "3", "--resume", *lora) == 0
    weights = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    prefixes = {k.split(".")[0] for k in weights}
    assert prefixes == {"unet", "text_encoder_2"}  # only the encoder asked for
    rows = [json.loads(line) for line in (run / "logs" / "base.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]

    merged = _sample(StableDiffusionXLPipeline.from_pretrained(run / "pipeline"))
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(str(run / "lora"), weight_name=name)
        assert np.abs(_sample(pipe) - merged).max() < 2e-3, name
    assert np.abs(_sample(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)) - merged).max() > 1e-3


def test_options_of_another_family_are_refused_by_name(
    tiny_sd: Path, tiny_sdxl: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    assert (
        train(
            tiny_sd, photos, tmp_path / "a", "--train-text-encoder", "--text-encoder-2-learning-rate", "1e-5"
        )
        == 2
    )
    assert "--text-encoder-2-learning-rate" in capsys.readouterr().err
    assert (
        train(tiny_sdxl, photos, tmp_path / "b", "--train-text-encoder", "--text-encoders", "text_encoder_3")
        == 2
    )
    err = capsys.readouterr().err
    assert "--text-encoders text_encoder_3" in err and "text_encoder text_encoder_2" in err
    assert train(tiny_sdxl, photos, tmp_path / "c", "--sr-model", str(tiny_sd)) == 2
    assert "--sr-model" in capsys.readouterr().err
    # refused before anything was written
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_memory_levers_keep_the_sdxl_vae_in_fp32_and_accept_another_vae(
    tiny_sdxl: Path, tiny_cascade: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    """Frozen parts go to the autocast dtype except a VAE that asks to be upcast (SDXL's overflows in fp16);
    --vae swaps in another VAE (e.g. an fp16-safe one) and is refused for pixel models."""
    from dreambooth.training.loop import _store_frozen

    (stage,) = load_sdxl(str(tiny_sdxl), vae=str(tiny_sdxl))
    for name, module in {"vae": stage.vae, "text_encoder": stage.text_encoders["text_encoder"]}.items():
        _store_frozen(module, torch.device("cpu"), torch.bfloat16)
        expected = torch.float32 if name == "vae" else torch.bfloat16
        assert next(module.parameters()).dtype == expected, name
    assert train(tiny_cascade, photos, tmp_path / "if", "--vae", str(tiny_sdxl)) == 2
    assert "--vae" in capsys.readouterr().err


def test_a_single_file_sdxl_checkpoint_is_recognised_and_trains(
    tiny_sdxl: Path, photos: Path, tmp_path: Path
) -> None:
    """An SDXL .safetensors in the original layout is told from SD 1.x/2.x by its keys, and trains offline
    with --model-config (the diffusers folder that supplies configs and tokenizers)."""
    from dreambooth.config import ModelConfig
    from dreambooth.export.single_file import export_single_file
    from dreambooth.models.loading import resolve_source

    single = export_single_file(
        StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), tmp_path / "sdxl.safetensors", torch.float32
    )
    assert resolve_source(ModelConfig(source=str(single))).family == "sdxl"
    run = tmp_path / "run"
    assert (
        train(single, photos, run, "--model-config", str(tiny_sdxl), "--max-steps", "1", "--lora-rank", "2")
        == 0
    )
    assert json.loads((run / "run.json").read_text())["model"]["family"] == "sdxl"
