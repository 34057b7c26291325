"""`dreambooth train` on a tiny FLUX.1 [dev]: packing, guidance, rectified flow, LoRA, resume, quantisation,
kohya LoRAs."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.loaders import lora_conversion_utils
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dreambooth.cli import main
from dreambooth.config import FlowConfig, LoraConfig, ModelConfig, OutputConfig, RunConfig
from dreambooth.data.training_set import Batch, TrainingSet, encode_examples, sample_batch
from dreambooth.export.lora_flux import export_lora_flux
from dreambooth.identifier import choose_identifier, default_id_range
from dreambooth.models._quantize import quantize_problems
from dreambooth.models.flux import (
    FAMILY,
    image_ids,
    load_flux,
    pack_latents,
    stage_from_pipeline,
    unpack_latents,
)
from dreambooth.models.loading import option_problems
from dreambooth.models.lora import LORA_FILE, add_lora, save_lora
from dreambooth.seeding import RowRandom
from dreambooth.training.step import compute_loss

from conftest import overfit
from tiny_transformers import TINY_RESOLUTION, build_tiny_flux

FAST = [
    "--class-noun", "dog", "--num-class-images", "2", "--class-steps", "2", "--class-batch-size", "2",
    "--validation-every", "0", "--validation-images", "1", "--validation-steps", "2", "--checkpoint-every",
    "2", "--logger", "none", "--learning-rate", "1e-3",
]
LORA = [
    "--lora-rank", "4", "--lora-alpha", "8", "--train-text-encoder", "--learning-rate", "1e-2",
    "--train-guidance", "2.0",
]
SHORT_T5 = 16
"""T5 tokens per prompt in the direct stage tests (the CLI runs use the pipeline's 512)."""


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 [dev] pipeline folder (guidance embedding, CLIP + T5, 64x64 px, dynamic shift)."""
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


def train(model: Path, photos: Path, run_dir: Path, *extra: str) -> int:
    return main([
        "train", "--model", str(model), "--instance-dir", str(photos), "--run-dir", str(run_dir), *FAST,
        *extra,
    ])


def _sample(pipe: FluxPipeline, prompt: str = "a dog") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def _stage(model: Path, **kwargs):
    (stage,) = load_flux(str(model), **kwargs)
    stage.max_sequence_length = SHORT_T5
    return stage


def _batch(stage, photos: Path) -> Batch:
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    data = TrainingSet(
        encode_examples(stage, images, ["a xon dog"] * 4), encode_examples(stage, images[::-1], ["a dog"] * 4)
    )
    return sample_batch(
        data, stage.tokenize, step=0, micro=0, accumulation=1, rank=0, world=1, batch_size=2, seed=0
    )


class _Echo(nn.Module):
    """A stand-in transformer that returns its packed input and records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls: list[dict] = []

    def forward(self, hidden_states, **kwargs):
        self.calls.append(kwargs)
        return (hidden_states,)


def test_text_packing_and_positions_are_flux_pipelines(tiny_flux: Path) -> None:
    """encode_text, the 2x2 packing and the RoPE ids equal FluxPipeline's own; predict unpacks what it
    packs."""
    stage = _stage(tiny_flux)
    prompts = ["a dog", "a xon dog on the beach"]
    with torch.no_grad():
        text = stage.encode_text(stage.tokenize(prompts))
        sequence, pooled, _ = stage.pipeline.encode_prompt(
            prompts, prompt_2=None, max_sequence_length=SHORT_T5
        )
    assert torch.equal(text.sequence, sequence) and torch.equal(text.pooled, pooled)  # T5 states, CLIP pooled

    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(pack_latents(latents), 8, 6), latents)
    assert torch.equal(FluxPipeline._unpack_latents(pack_latents(latents), 64, 48, 8), latents)
    assert torch.equal(
        image_ids(4, 3, "cpu", torch.float32),
        FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
    )

    echo = _Echo()
    level = torch.tensor([0.25, 0.8])
    out = dataclasses.replace(stage, denoiser=echo).predict(latents, level, text, {}, RowRandom([0, 1]))
    assert torch.equal(out, latents)  # packed in, unpacked out: compared with noise - x0 as it is
    given = echo.calls[-1]
    assert torch.equal(given["timestep"], level)  # sigma, as the pipeline's t / 1000
    assert torch.equal(given["guidance"], torch.full((2,), stage.guidance))  # [dev]: the training guidance
    assert given["txt_ids"].shape == (SHORT_T5, 3) and not given["txt_ids"].any()
    stage.pipeline.transformer.register_to_config(guidance_embeds=False)  # as FLUX.1 [schnell]
    dataclasses.replace(stage, denoiser=echo).predict(latents, level, text, {}, RowRandom([0, 1]))
    assert echo.calls[-1]["guidance"] is None


def test_stage_trains_and_samples_at_the_models_size_with_its_shift(tiny_flux: Path) -> None:
    stage = _stage(tiny_flux, flow=FlowConfig(guidance=2.5))
    assert stage.resolution == TINY_RESOLUTION and stage.guidance == 2.5 and stage.default_guidance == 3.5
    assert stage.objective.dynamic_shift is not None  # FLUX.1 [dev]'s scheduler: use_dynamic_shifting
    stage.pipeline.set_progress_bar_config(disable=True)
    assert (
        stage.pipeline("a dog", num_inference_steps=1, output_type="pil").images[0].size
        == (TINY_RESOLUTION,) * 2
    )
    assert {"vae", "text_encoder_2"} == set(stage.frozen_modules()) and set(stage.text_encoders) == {
        "text_encoder"
    }
    small = stage_from_pipeline(stage.pipeline, resolution=32)  # --resolution: train and sample smaller
    assert small.resolution == 32 and small.pipeline(
        "a dog", num_inference_steps=1, output_type="pil"
    ).images[0].size == (32, 32)
    with pytest.raises(ValueError, match="--resolution 40"):
        load_flux(str(tiny_flux), resolution=40)
    stage.pipeline.transformer.register_to_config(guidance_embeds=False)  # as FLUX.1 [schnell]
    assert stage_from_pipeline(stage.pipeline).default_guidance == 0.0  # its pipeline ignores guidance_scale


def test_loss_falls_on_a_fixed_batch_with_clip_training(tiny_flux: Path, photos: Path) -> None:
    stage = _stage(tiny_flux)
    batch = _batch(stage, photos)
    losses, terms = overfit(stage, batch, (stage.denoiser, *stage.text_encoders.values()), steps=25, lr=2e-3)
    assert terms["loss/instance"].shape == (2,) and terms["loss/prior"].shape == (2,)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_per_sample_weights_are_split_with_the_rows(tiny_flux: Path, photos: Path) -> None:
    """loss = mean(w_i err_i) over instance rows + lambda mean(w_j err_j) over class rows, w = sigma^-2.

    diffusers' FLUX DreamBooth script weighted the whole batch before splitting it into halves
    (fixed 2026-05); here every row keeps its own weight.
    """
    stage = _stage(tiny_flux, flow=FlowConfig(weighting="sigma_sqrt"))
    batch = _batch(stage, photos)
    with torch.no_grad():
        loss, terms = compute_loss(stage, batch, prior_weight=0.5)
        rng = RowRandom(batch.seeds)  # the step's draws, replayed
        x0 = stage.sample_x0(batch.encoded, rng)
        noise = rng.randn(tuple(x0.shape[1:]))
        sigma = stage.objective.draw_levels(rng, x0)
        prediction = stage.predict(
            stage.objective.noisy(x0, noise, sigma), sigma, stage.encode_text(batch.tokens), batch.encoded,
            rng,
        )
    error = (prediction - (noise - x0)).pow(2).flatten(1).mean(1)
    weight = sigma**-2.0
    n = batch.n_instance
    assert loss.item() == pytest.approx(
        (weight[:n] * error[:n]).mean().item() + 0.5 * (weight[n:] * error[n:]).mean().item(), rel=1e-5
    )
    assert torch.allclose(terms["loss/instance"], weight[:n] * error[:n]) and torch.allclose(
        terms["loss/prior"], weight[n:] * error[n:]
    )
    swapped = weight.roll(n)  # each half weighted by the other half's sigmas
    assert loss.item() != pytest.approx(
        (swapped[:n] * error[:n]).mean().item() + 0.5 * (swapped[n:] * error[n:]).mean().item(), rel=1e-3
    )


def test_identifier_is_a_rare_t5_token_and_one_clip_token(tiny_flux: Path) -> None:
    """The paper samples [V] from T5-XXL's ids 5000-10000; FLUX's tokenizers are ordered T5 first for that."""
    assert default_id_range(32100) == (5000, 10000)  # the real T5 vocabulary: exactly the paper's range
    stage = _stage(tiny_flux)
    t5, clip = stage.tokenizers
    assert t5 is stage.pipeline.tokenizer_2 and clip is stage.pipeline.tokenizer
    identifier = choose_identifier(list(stage.tokenizers), "dog", seed=3)
    low, high = identifier.id_range
    assert low >= default_id_range(t5.vocab_size)[0] and low <= identifier.token_ids[0] <= high
    for tokenizer, (token,) in zip((t5, clip), identifier.token_ids_per_tokenizer):  # one whole token in each
        ids = tokenizer(f"a {identifier.text} dog").input_ids
        assert len(ids) == len(tokenizer("a dog").input_ids) + 1 and token in ids


def test_lora_run_reloads_in_stock_diffusers_and_resumes_to_the_same_losses(
    tiny_flux: Path, photos: Path, tmp_path: Path
) -> None:
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert train(tiny_flux, photos, resumed, "--max-steps", "2", *LORA) == 0
    assert train(tiny_flux, photos, resumed, "--max-steps", "3", "--resume", *LORA) == 0
    assert train(tiny_flux, photos, straight, "--max-steps", "3", *LORA) == 0
    losses = lambda run: [
        json.loads(line)["loss/total"] for line in (run / "logs" / "base.jsonl").read_text().splitlines()
    ]  # noqa: E731
    assert len(losses(resumed)) == 3 and losses(resumed) == losses(straight)

    info = json.loads((resumed / "run.json").read_text())
    assert (
        info["model"]["family"] == "flux" and info["resolution"] == {"base": TINY_RESOLUTION}
        and info["method"] == "lora"
    )
    tiny = FluxPipeline.from_pretrained(tiny_flux)
    # T5's rare range
    assert info["identifier"] == choose_identifier([tiny.tokenizer_2, tiny.tokenizer], "dog").text
    assert all(Image.open(p).size == (TINY_RESOLUTION,) * 2 for p in (resumed / "class_images").glob("*.png"))
    weights = load_file(resumed / "lora" / LORA_FILE)
    assert {k.split(".")[0] for k in weights} == {"transformer", "text_encoder"}

    merged = _sample(FluxPipeline.from_pretrained(resumed / "pipeline"))
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    base = _sample(pipe)
    pipe.load_lora_weights(str(resumed / "lora"))
    assert np.abs(_sample(pipe) - merged).max() < 2e-3  # alpha/rank = 2 survives
    assert np.abs(base - merged).max() > 1e-3

    # The kohya layout of the same adapters, read back through diffusers' own kohya reader
    # (its single-block widths set to the tiny model's), gives the same images.
    kohya = export_lora_flux(resumed / "lora" / LORA_FILE, tmp_path / "kohya.safetensors", base=pipe)
    with safe_open(str(kohya), "pt") as f:
        header, keys = f.metadata(), set(f.keys())
    assert (
        header["modelspec.architecture"] == "flux-1-dev/lora" and header["ss_base_model_version"] == "flux1"
    )
    assert {
        "lora_unet_double_blocks_0_img_attn_qkv.alpha", "lora_unet_single_blocks_1_linear1.lora_up.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    } <= keys
    fresh = FluxPipeline.from_pretrained(tiny_flux)
    fresh.load_lora_weights(_kohya_reader(fresh.transformer)(load_file(kohya)))
    # CLIP's adapters were read too
    assert any("lora_A" in name for name, _ in fresh.text_encoder.named_parameters())
    assert np.abs(_sample(fresh) - merged).max() < 2e-3


def test_kohya_layout_implies_the_diffusers_weights_for_every_layer(tiny_flux: Path, tmp_path: Path) -> None:
    """Adapters on every linear layer (fused parts, modulations, embedders, the final layer's swapped
    scale/shift): the kohya file read back by diffusers' reader gives each layer the same weight delta."""
    stage = _stage(tiny_flux)
    # full paths: exact matches
    linear = [name for name, module in stage.denoiser.named_modules() if isinstance(module, nn.Linear)]
    stage.lora_targets = {"transformer": tuple(linear), "text_encoder": stage.lora_targets["text_encoder"]}
    add_lora(
        stage, LoraConfig(rank=2, alpha=3.0),
        {"transformer": stage.denoiser, "text_encoder": stage.text_encoders["text_encoder"]},
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in stage.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_()
    diffusers_file = save_lora(stage, tmp_path / "lora")
    kohya = load_file(export_lora_flux(diffusers_file, tmp_path / "kohya.safetensors", base=stage.pipeline))
    assert (
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in kohya
        and "lora_unet_guidance_in_in_layer.alpha" in kohya
    )

    original = load_file(diffusers_file)
    converted = _kohya_reader(stage.denoiser)(dict(kohya))
    # The reader names the layers outside the blocks without the "transformer." prefix.
    converted = {
        k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v
        for k, v in converted.items()
    }
    modules = {
        k.removesuffix(".lora_A.weight") for k in original
        if k.startswith("transformer.") and k.endswith(".lora_A.weight")
    }
    assert len(modules) == len(linear)
    for module in modules:
        expected = original[f"{module}.lora_B.weight"] @ original[f"{module}.lora_A.weight"] * (3.0 / 2)
        read = converted[f"{module}.lora_B.weight"] @ converted[f"{module}.lora_A.weight"]
        assert torch.allclose(read, expected, atol=1e-5), module


def test_full_finetuning_and_quantisation_are_refused_before_anything_is_written(
    tiny_flux: Path, photos: Path, tmp_path: Path, capsys,
) -> None:
    assert train(tiny_flux, photos, tmp_path / "full", "--max-steps", "1") == 2
    assert "full fine-tuning of a flux model is not offered" in capsys.readouterr().err
    cfg = RunConfig(
        model=ModelConfig(quantize="nf4"), lora=LoraConfig(rank=4), output=OutputConfig(save_pipeline=False)
    )
    problems = option_problems(cfg, FAMILY)
    assert problems == quantize_problems("nf4")  # only what this machine lacks, if anything
    if problems:
        assert (
            train(
                tiny_flux, photos, tmp_path / "q", "--quantize", "nf4", "--lora-rank", "4",
                "--no-save-pipeline",
            )
            == 2
        )
        assert "--quantize nf4" in capsys.readouterr().err
        with pytest.raises(ValueError, match="--quantize nf4"):
            load_flux(str(tiny_flux), quantize="nf4")
    assert not (tmp_path / "full").exists() and not (tmp_path / "q").exists()


@pytest.mark.skipif(
    bool(quantize_problems("nf4")),
    reason="diffusers' bitsandbytes quantizer needs a CUDA GPU and bitsandbytes; "
    "the error path is tested instead",
)
def test_nf4_transformer_loads_and_trains_lora(tiny_flux: Path, photos: Path) -> None:
    import bitsandbytes as bnb

    stage = _stage(tiny_flux, quantize="nf4")
    assert isinstance(stage.denoiser.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    stage.pipeline.to("cuda")
    add_lora(stage, LoraConfig(rank=4), {"transformer": stage.denoiser})
    loss, _ = compute_loss(stage, _batch(stage, photos).to(torch.device("cuda")), prior_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss)


def _kohya_reader(transformer):
    """diffusers' kohya FLUX LoRA reader with FLUX.1's single-block widths (3072 x 3, 12288) replaced by the
    model's.

    The reader hard-codes FLUX.1's sizes where it splits a single block's fused `linear1`; the rest
    of its logic runs as it is.
    """
    block = transformer.single_transformer_blocks[0]
    dims = [
        block.attn.to_q.out_features, block.attn.to_k.out_features, block.attn.to_v.out_features,
        block.proj_mlp.out_features,
    ]
    source = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    assert "dims=[3072, 3072, 3072, 12288]" in source, (
        "diffusers' kohya FLUX reader changed: update this test"
    )
    namespace = dict(vars(lora_conversion_utils))
    exec(source.replace("dims=[3072, 3072, 3072, 12288]", f"dims={dims}"), namespace)  # noqa: S102
    return namespace["_convert_kohya_flux_lora_to_diffusers"]
