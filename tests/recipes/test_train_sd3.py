"""`dreambooth train` on a tiny SD3.5: three text encoders, rectified flow, full and LoRA runs, resume,
quantisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.config import FlowConfig
from dreambooth.data.training_set import Batch, TrainingSet, encode_captions, encode_examples, sample_batch
from dreambooth.identifier import default_id_range
from dreambooth.models.sd3 import load_sd3
from dreambooth.models.spec import TextConditioning
from dreambooth.training.step import compute_loss

from conftest import overfit
from tiny_transformers import TINY_RESOLUTION, build_tiny_sd3

FAST = [
    "--class-noun", "dog", "--num-class-images", "2", "--class-steps", "2", "--class-batch-size", "2",
    "--validation-every", "0", "--validation-images", "1", "--validation-steps", "2", "--checkpoint-every",
    "2", "--logger", "none", "--learning-rate", "1e-3",
]
SHORT_T5 = 16
"""T5 tokens per prompt in the direct stage tests (the CLI runs use the pipeline's 256)."""


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3.5 pipeline folder (CLIP-L, CLIP-G of another vocabulary, T5; 64x64 px; shift 3)."""
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


def train(model: Path, photos: Path, run_dir: Path, *extra: str) -> int:
    return main([
        "train", "--model", str(model), "--instance-dir", str(photos), "--run-dir", str(run_dir), *FAST,
        *extra,
    ])


def _sample(pipe: StableDiffusion3Pipeline, prompt: str = "a dog") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]


def _stage(model: Path, **kwargs):
    (stage,) = load_sd3(str(model), **kwargs)
    stage.max_sequence_length = SHORT_T5
    return stage


def _images(photos: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]


def _batch(data: TrainingSet, stage, batch_size: int = 2) -> Batch:
    return sample_batch(
        data, stage.tokenize, step=0, micro=0, accumulation=1, rank=0, world=1, batch_size=batch_size, seed=0
    )


def test_class_rows_are_conditioned_on_the_class_prompt_as_the_pipeline_encodes_it(
    tiny_sd3: Path, photos: Path
) -> None:
    """Cached and live conditioning of every row equal StableDiffusion3Pipeline.encode_prompt of its own
    caption.

    diffusers' SD3 DreamBooth script once encoded only the instance prompt, so class rows trained
    on the subject's conditioning; here each caption is encoded, the class prompt included.
    """
    stage = _stage(tiny_sd3)
    images = _images(photos)
    instance, classes = (
        encode_examples(stage, images, ["a xon dog"] * 4), encode_examples(stage, images, ["a dog"] * 4),
    )
    cache = encode_captions(stage, instance.captions + classes.captions)
    cached = _batch(TrainingSet(instance, classes, cache), stage)
    live = _batch(TrainingSet(instance, classes), stage)
    with torch.no_grad():
        live_text = stage.encode_text(live.tokens)
        reference = {
            prompt: stage.pipeline.encode_prompt(
                prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=SHORT_T5
            )
            for prompt in ("a xon dog", "a dog")
        }
    t5_width = stage.pipeline.text_encoder_3.config.d_model
    assert cached.text.sequence.shape == (4, 77 + SHORT_T5, t5_width) and cached.text.pooled.shape == (
        4, 32 + 48,
    )
    for text in (cached.text, live_text):
        for row, prompt in enumerate(["a xon dog"] * 2 + ["a dog"] * 2):  # instance rows, then class rows
            sequence, _, pooled, _ = reference[prompt]
            torch.testing.assert_close(text.sequence[row], sequence[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(text.pooled[row], pooled[0], rtol=0, atol=1e-6)
    assert not torch.allclose(reference["a xon dog"][0], reference["a dog"][0])
    assert stage.resolution == TINY_RESOLUTION and instance.encoded["latent_mean"].shape[1:] == (16, 8, 8)


def test_loss_falls_on_a_fixed_batch_with_both_clips_training(tiny_sd3: Path, photos: Path) -> None:
    stage = _stage(tiny_sd3)
    images = _images(photos)
    data = TrainingSet(
        encode_examples(stage, images, ["a xon dog"] * 4), encode_examples(stage, images[::-1], ["a dog"] * 4)
    )
    batch = _batch(data, stage)
    losses, terms = overfit(stage, batch, (stage.denoiser, *stage.text_encoders.values()), steps=30, lr=5e-3)
    assert terms["loss/instance"].shape == (2,) and terms["loss/prior"].shape == (2,)
    assert ((0 < terms["level/instance"]) & (terms["level/instance"] < 1)).all()
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_prior_term_weighs_each_half_by_its_own_noise_levels(tiny_sd3: Path, photos: Path) -> None:
    """With sigma^-2 weights: loss = mean(w e) over instance rows + lambda mean(w e) over class rows.

    Each row's w_i e_i is measured alone (rows draw from their own generators, so a row alone gets
    the same noise and level as in the batch), and w_i by dividing by the unweighted e_i. The
    batch loss must match the split sum, and differ from it with the halves' weights averaged or swapped.
    """
    stage = _stage(tiny_sd3, flow=FlowConfig(weighting="sigma_sqrt"))
    images = _images(photos)
    instance, classes = (
        encode_examples(stage, images, ["a xon dog"] * 4), encode_examples(stage, images, ["a dog"] * 4),
    )
    data = TrainingSet(instance, classes, encode_captions(stage, instance.captions + classes.captions))
    batch, prior_weight = _batch(data, stage, batch_size=3), 0.5

    def row(i: int) -> Batch:  # row i alone, as an instance row
        text = TextConditioning.stack([batch.text.unbind()[i]])
        return Batch({k: v[i : i + 1] for k, v in batch.encoded.items()}, batch.seeds[i : i + 1], 1, 0, text)

    with torch.no_grad():
        loss, terms = compute_loss(stage, batch, prior_weight)
        weighted = torch.stack([compute_loss(stage, row(i), prior_weight)[0] for i in range(6)])
        unweighted_stage = dataclasses.replace(
            stage, objective=dataclasses.replace(stage.objective, weighting="none")
        )
        error = torch.stack([compute_loss(unweighted_stage, row(i), prior_weight)[0] for i in range(6)])
    w, inst, cls = weighted / error, slice(0, 3), slice(3, 6)
    assert w.max() > 2 * w.min()  # the rows' levels differ enough for the check to bite

    def combined(w_inst: torch.Tensor, w_cls: torch.Tensor) -> float:
        return float((w_inst * error[inst]).mean() + prior_weight * (w_cls * error[cls]).mean())

    assert loss.item() == pytest.approx(combined(w[inst], w[cls]), rel=1e-5)
    torch.testing.assert_close(terms["loss/prior"], weighted[cls], rtol=1e-5, atol=0)
    averaged = w.mean().expand(3)
    for wrong in (combined(averaged, averaged), combined(w[cls], w[inst])):
        assert abs(wrong - loss.item()) > 0.01 * loss.item()


def test_resolution_sets_the_training_and_sampling_size(tiny_sd3: Path, photos: Path) -> None:
    stage = _stage(tiny_sd3, resolution=32)
    data = TrainingSet(encode_examples(stage, _images(photos), ["a xon dog"] * 4))
    assert stage.resolution == 32 and data.instance.encoded["latent_mean"].shape[1:] == (16, 4, 4)
    with torch.no_grad():
        loss, _ = compute_loss(stage, _batch(data, stage), prior_weight=1.0)
    # class images and validation: 32 px too
    assert torch.isfinite(loss) and _sample(stage.pipeline).shape == (32, 32, 3)
    # not whole 2x2 patches of latents; beyond the tiny transformer's 16x16 position embeddings
    for bad in (40, 512):
        with pytest.raises(ValueError, match=f"--resolution {bad}"):
            load_sd3(str(tiny_sd3), resolution=bad)


def test_full_finetune_of_transformer_and_both_clips_loads_in_stock_diffusers(
    tiny_sd3: Path, photos: Path, tmp_path: Path
) -> None:
    """Medium-style full fine-tuning: transformer and both CLIPs train; T5 and the VAE stay as they were."""
    run = tmp_path / "run"
    extra = ["--train-text-encoder", "--text-encoder-2-learning-rate", "1e-4", "--gradient-checkpointing"]
    assert train(tiny_sd3, photos, run, "--max-steps", "2", *extra) == 0
    info = json.loads((run / "run.json").read_text())
    assert (
        info["model"]["family"] == "sd3" and info["status"] == "done"
        and info["resolution"] == {"base": TINY_RESOLUTION}
    )
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    identifier = info["identifier"]  # from T5's rare range, one token in T5 and in both CLIP vocabularies
    t5_ids = base.tokenizer_3(identifier, add_special_tokens=False).input_ids
    low, high = default_id_range(base.tokenizer_3.vocab_size)
    assert len(t5_ids) == 1 and low <= t5_ids[0] <= high
    for tokenizer in (base.tokenizer_3, base.tokenizer, base.tokenizer_2):
        assert len(tokenizer(f"a {identifier} dog").input_ids) == len(tokenizer("a dog").input_ids) + 1
    class_images = sorted((run / "class_images").glob("*.png"))
    assert len(class_images) == 2 and all(Image.open(p).size == (TINY_RESOLUTION,) * 2 for p in class_images)

    pipe = StableDiffusion3Pipeline.from_pretrained(run / "pipeline")
    assert _sample(pipe).shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        trained, original = getattr(pipe, name), getattr(base, name)
        assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters())), name
    for name in ("text_encoder_3", "vae"):
        trained, original = getattr(pipe, name), getattr(base, name)
        assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters())), name


def test_lora_run_reloads_with_load_lora_weights_and_resumes_exactly(
    tiny_sd3: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    lora = [
        "--lora-rank", "4", "--train-text-encoder", "--learning-rate", "1e-2", "--flow-weighting",
        "sigma_sqrt",
    ]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert train(tiny_sd3, photos, resumed, "--max-steps", "2", *lora) == 0
    assert train(tiny_sd3, photos, resumed, "--max-steps", "3", "--resume", *lora) == 0
    assert train(tiny_sd3, photos, straight, "--max-steps", "3", "--no-save-pipeline", *lora) == 0
    logs = [
        [json.loads(line) for line in (run / "logs" / "base.jsonl").read_text().splitlines()]
        for run in (resumed, straight)
    ]
    assert [r["step"] for r in logs[0]] == [1, 2, 3] == [r["step"] for r in logs[1]]
    # step 3 after resuming = uninterrupted
    assert logs[0][2]["loss/total"] == pytest.approx(logs[1][2]["loss/total"], rel=1e-5)

    weights = load_file(resumed / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any(".attn.add_q_proj." in k for k in weights) and not any(".ff." in k for k in weights)
    merged = _sample(StableDiffusion3Pipeline.from_pretrained(resumed / "pipeline"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(resumed / "lora"))
    assert np.abs(_sample(pipe) - merged).max() < 2e-3
    assert np.abs(_sample(StableDiffusion3Pipeline.from_pretrained(tiny_sd3)) - merged).max() > 1e-3
    # validation: 3 prompts, sampled at the end
    grid = Image.open(resumed / "samples" / "base" / "step-000003.png")
    assert grid.size[0] >= TINY_RESOLUTION

    # the names ComfyUI's loader maps for SD3 (`transformer.<module>` with lora_A/lora_B): the export says so
    transformer = [k for k in weights if k.startswith("transformer.")]
    assert transformer and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in transformer)
    assert main(["export", str(resumed), "--format", "lora-kohya"]) == 2
    err = capsys.readouterr().err
    assert "ComfyUI loads an SD3 LoRA in diffusers' layout: export 'lora-diffusers'" in err


def test_quantize_is_refused_with_its_flag_named(
    tiny_sd3: Path, tiny_sd: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    # full fine-tuning, pipeline saved
    assert train(tiny_sd3, photos, tmp_path / "a", "--quantize", "nf4") == 2
    err = capsys.readouterr().err
    assert "--quantize nf4 freezes" in err and "--lora-rank" in err and "--no-save-pipeline" in err
    assert (
        train(tiny_sd3, photos, tmp_path / "b", "--quantize", "fp8", "--lora-rank", "4", "--no-save-pipeline")
        == 2
    )
    assert "--quantize nf4 or int8" in capsys.readouterr().err
    assert (
        train(tiny_sd, photos, tmp_path / "c", "--quantize", "int8", "--lora-rank", "4", "--no-save-pipeline")
        == 2
    )
    assert "unquantised only" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before anything was written


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a CUDA machine the quantised load itself is tested below"
)
def test_quantize_without_a_gpu_fails_before_loading_with_the_fix(tiny_sd3: Path) -> None:
    for mode in ("nf4", "int8"):
        with pytest.raises(ValueError, match=f"--quantize {mode}.*(CUDA GPU|bitsandbytes)"):
            load_sd3(str(tiny_sd3), quantize=mode)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="diffusers' bitsandbytes quantizer needs a CUDA GPU ('No GPU found')",
)
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_transformer_trains_lora_adapters(tiny_sd3: Path, photos: Path, mode: str) -> None:
    import bitsandbytes as bnb

    from dreambooth.config import LoraConfig
    from dreambooth.models.lora import add_lora

    stage = _stage(tiny_sd3, quantize=mode)
    layer = stage.denoiser.transformer_blocks[0].attn.to_q
    assert isinstance(layer, bnb.nn.Linear4bit if mode == "nf4" else bnb.nn.Linear8bitLt)
    stage.pipeline.to("cuda")
    add_lora(stage, LoraConfig(rank=4), {"transformer": stage.denoiser})
    data = TrainingSet(encode_examples(stage, _images(photos), ["a xon dog"] * 4))
    loss, _ = compute_loss(stage, _batch(data, stage).to(torch.device("cuda")), prior_weight=1.0)
    loss.backward()
    grads = [p.grad for n, p in stage.denoiser.named_parameters() if "lora_" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)
