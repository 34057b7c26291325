"""Tiny, randomly initialised models of the real diffusers/transformers classes, built offline.

They have the structure of the real thing (Stable Diffusion, an IF-style cascade) at a size that
trains a step in milliseconds on CPU, so tests exercise the real loaders, pipelines and savers.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = (
    "a an the of photo picture dog cat backpack toy cube ball cup on in at with beach snow jungle city "
    "mountain street grass floor fabric red blue green purple pink white shiny wet background water rug"
).split()
# Short strings seen only a few times: whole-word tokens with a weak prior, as in a real vocabulary.
RARE = (
    "xon", "qak", "vip", "zor", "tep", "rin", "mok", "dax", "wug", "fep", "lom", "sks", "jib", "kel", "pov",
)


@cache
def _clip_vocab(variant: int = 0) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    # variant 1 learns from the words in another order and repeats the rare ones more: the same
    # words get other ids, as two real tokenizers trained on different data would give them.
    words, rare_repeats = (
        (WORDS, 3) if variant == 0 else (tuple(reversed(WORDS)) + ("zebra", "yacht", "quilt"), 5)
    )
    corpus = [" ".join(words)] * 40 + [" ".join(RARE)] * rare_repeats
    alphabet = [chr(c) for c in range(33, 127)]
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=320 + 40 * variant, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet, end_of_word_suffix="</w>", min_frequency=1, show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for char in alphabet:  # CLIP's byte-level BPE needs every character as a word end too
        vocab.setdefault(char + "</w>", len(vocab))
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"])
    return vocab, merges


def tiny_clip_tokenizer(variant: int = 0, **kwargs) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a few hundred tokens (transformers 5 ignores vocab_file=: pass vocab=).

    `variant` 1 is a second vocabulary (other ids, other size), as SDXL's two tokenizers need to be
    for a test to tell them apart.
    """
    vocab, merges = _clip_vocab(variant)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, **kwargs)


def tiny_clip_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_tiny_sd(path: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny Stable Diffusion pipeline (32x32 pixels, 4x16x16 latents) in diffusers format."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer), seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path, *, seed: int = 0) -> Path:
    """Save a tiny SDXL pipeline (64x64 pixels, 4x8x8 latents) in diffusers format.

    What matters of the real one: two CLIP text encoders with different vocabularies and widths (the
    second wider, with a text projection, whose pooled output SDXL adds to the time embedding;
    diffusers' single-file loader tells the two apart by width), cross-attention
    on both encoders' penultimate states side by side, the `text_time` addition embedding of the
    six micro-conditioning ids, and a VAE that asks to be upcast (`force_upcast`).
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(0), tiny_clip_tokenizer(1, pad_token="!")
    text_encoder = tiny_clip_text_encoder(len(tokenizer), seed)
    torch.manual_seed(seed + 1)
    config_2 = CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=24, hidden_act="gelu",
    )
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + 48, attention_head_dim=4,
        norm_num_groups=8, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


TINY_CASCADE = dict(
    base_resolution=16, sr_resolution=32, text_width=32, text_layers=1, base_channels=(16, 32),
    sr_channels=(16, 32), head_dim=8, english_words=1500,
)


def build_tiny_cascade(path: Path, seed: int = 0) -> Path:
    """Save a tiny IF-format cascade (16x16 base, 16->32 super-resolution) with stage_1/ and stage_2/."""
    from dreambooth.pocket.model import PocketArchitecture, build_cascade

    return build_cascade(path, PocketArchitecture(**TINY_CASCADE), seed)


_TINY_VIT = {
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "image_size": 32, "patch_size": 8,
}


def build_tiny_dino(path: Path, seed: int = 0) -> Path:
    """A tiny random ViT saved like facebook/dino-vits16 (no pooler; 32 px input: the embedders crop to the
    model's size)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**_TINY_VIT), add_pooling_layer=False).save_pretrained(path)
    return path


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A tiny random CLIP (text + vision + projections) with the tiny CLIP tokenizer, saved like
    openai/clip-*."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(path)
    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    text = {**_TINY_VIT, **special, "vocab_size": len(tokenizer), "max_position_embeddings": 77}
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=_TINY_VIT, projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    return path


def tiny_scorer_flags(folder: Path) -> list[str]:
    """Tiny DINO and CLIP folders, as the CLI flags that select them."""
    return [
        "--eval-dino", str(build_tiny_dino(folder / "dino")), "--eval-clip",
        str(build_tiny_clip(folder / "clip")),
    ]
