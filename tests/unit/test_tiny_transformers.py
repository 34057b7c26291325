"""The tiny FLUX.1 and SD3.5 pipelines: they save, reload offline and sample with the stock diffusers
pipelines."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import T5TokenizerFast

from tiny_transformers import TINY_RESOLUTION, build_tiny_flux, build_tiny_sd3, tiny_t5_tokenizer


def _sample(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of sks dog", num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION,
        generator=generator, output_type="pt",
    ).images


def test_t5_tokenizer_is_case_sensitive_and_reloads(tmp_path: Path) -> None:
    tokenizer = tiny_t5_tokenizer()
    ids = tokenizer("a photo of sks dog").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁sks", "▁dog", "</s>"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("Sks").input_ids) == ["▁S", "k", "s", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(tmp_path)
    reloaded = T5TokenizerFast.from_pretrained(tmp_path)
    assert reloaded("A Photo of Sks dog").input_ids == tokenizer("A Photo of Sks dog").input_ids
    assert len(reloaded) == len(tokenizer)


def test_tiny_flux_reloads_and_samples(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(build_tiny_flux(tmp_path / "flux"))
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert transformer.guidance_embeds and transformer.in_channels == 4 * vae.latent_channels == 64
    assert (vae.shift_factor, vae.scaling_factor) == (0.1159, 0.3611) and pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.use_dynamic_shifting
    prompt_embeds, pooled, _ = pipe.encode_prompt("a dog", prompt_2=None, max_sequence_length=16)
    assert prompt_embeds.shape == (1, 16, transformer.joint_attention_dim)
    assert pooled.shape == (1, transformer.pooled_projection_dim)
    images = _sample(pipe)
    assert images.shape == (1, 3, TINY_RESOLUTION, TINY_RESOLUTION) and images.isfinite().all()


def test_tiny_sd3_reloads_and_samples(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(build_tiny_sd3(tmp_path / "sd3"))
    transformer = pipe.transformer.config
    assert len(pipe.tokenizer) != len(pipe.tokenizer_2) and pipe.tokenizer_2.pad_token == "!"
    projections = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert transformer.pooled_projection_dim == projections <= transformer.joint_attention_dim
    assert pipe.vae.config.latent_channels == transformer.in_channels == 16
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        "a dog", None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    assert prompt_embeds.shape == (1, 77 + 16, transformer.joint_attention_dim) and pooled.shape == (
        1, projections,
    )
    images = _sample(pipe)
    assert images.shape == (1, 3, TINY_RESOLUTION, TINY_RESOLUTION) and images.isfinite().all()
