"""A tiny DeepFloyd IF cascade with the released models' properties, built offline.

Where the pocket cascade differs from IF-I/IF-II, this one is like IF:
- both stages' schedulers use `variance_type="learned_range"` and the UNets output 6 channels
  (epsilon + the variance interpolation), with IF's dynamic thresholding;
- the T5 tokenizer is case-sensitive (a SentencePiece-style vocabulary with 'OHWX' and 'ohwx' as
  different tokens), while IF's pipelines lower-case every prompt;
- the T5 encoder has dropout 0.1, as t5-v1_1-xxl;
- stage II has its own copy of the text encoder (IF-II ships one) and an image-noising scheduler;
- stage III is a Stable Diffusion x4 upscaler: a 4x VAE (scaling factor 0.08333), a 7-channel UNet
  whose `class_labels` embed the low-res input's noise level, v-prediction, a CLIP text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from tiny_models import RARE, WORDS

CASED = ("Dog", "Cube", "Photo", "OHWX", "Beach", "The", "A")
"""Capitalised words with their own tokens, as a real T5 vocabulary has them."""

_NO_SAFETY = dict(
    safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False
)


def tiny_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A case-sensitive BPE with T5's conventions: no lower-casing, '▁' word starts, '</s>' appended."""
    corpus = [" ".join(WORDS)] * 40 + [" ".join(RARE)] * 3 + [" ".join(CASED)] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    alphabet = [chr(c) for c in range(33, 127)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=alphabet, min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=77,
    )


def tiny_t5(vocab_size: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.1,
        pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config)


def _unet(resolution: int, in_channels: int, seed: int, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=in_channels, out_channels=6, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, encoder_hid_dim=32,
        encoder_hid_dim_type="text_proj", addition_embed_type="text", addition_embed_type_num_heads=4,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8,
        **extra,
    )


def _learned_range_scheduler() -> DDPMScheduler:
    # IF-I/IF-II's scheduler config: learned variance, epsilon, dynamic thresholding.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
        prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
    )


def build_tiny_upscaler(path: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionUpscalePipeline (x4: 32 -> 128 px) with the released model's structure."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionUpscalePipeline

    from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=128, scaling_factor=0.08333,
    )
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, num_class_embeds=1000,
    )
    betas = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=tiny_clip_text_encoder(len(tokenizer), seed), tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**betas),
        scheduler=DDIMScheduler(**betas, prediction_type="v_prediction"), max_noise_level=350,
    )
    pipeline.save_pretrained(path)
    return path


def build_tiny_if(path: Path, seed: int = 0, *, upscaler: bool = False) -> Path:
    """Save stage_1/ (16x16 text-to-image) and stage_2/ (16 -> 32 super-resolution) under `path`,
    and with `upscaler` stage_3/ (32 -> 128)."""
    tokenizer = tiny_t5_tokenizer()
    base = IFPipeline(
        tokenizer=tokenizer, text_encoder=tiny_t5(len(tokenizer), seed), unet=_unet(16, 3, seed),
        scheduler=_learned_range_scheduler(), **_NO_SAFETY,
    )
    sr = IFSuperResolutionPipeline(
        tokenizer=tokenizer, text_encoder=tiny_t5(len(tokenizer), seed),
        unet=_unet(32, 6, seed + 1, class_embed_type="timestep"), scheduler=_learned_range_scheduler(),
        image_noising_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small"
        ),
        **_NO_SAFETY,
    )
    base.save_pretrained(path / "stage_1")
    sr.save_pretrained(path / "stage_2")
    if upscaler:
        build_tiny_upscaler(path / "stage_3", seed)
    return path
