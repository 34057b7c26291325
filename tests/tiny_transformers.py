"""Tiny, randomly initialised FLUX.1 and SD3.5 pipelines of the real diffusers/transformers classes, built
offline.

They keep what the released models' training and sampling depend on (text encoders and their
tokenizers, pooled vs sequence conditioning, 16-channel latents with shift and scale, the 8x VAE,
FLUX's 2x2 latent packing and guidance embedding, the schedulers' shifts) at a size that builds in
about a second and samples a 64x64 image in two steps on CPU.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import CLIPTextConfig, T5Config, T5EncoderModel, T5TokenizerFast

from tiny_models import RARE, WORDS, tiny_clip_text_encoder, tiny_clip_tokenizer

TINY_RESOLUTION = 64
"""Pixel size of both tiny models: an 8x8 latent (the real VAEs' 8x), 4x4 FLUX tokens / SD3 patches."""

FLUX1_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
"""FLUX.1-dev's scheduler_config.json (FlowMatchEulerDiscreteScheduler); `shift` is unused under dynamic
shifting."""

SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
"""SD3.5 Large's scheduler_config.json (FlowMatchEulerDiscreteScheduler)."""

FLUX1_VAE = dict(shift_factor=0.1159, scaling_factor=0.3611)
SD35_VAE = dict(shift_factor=0.0609, scaling_factor=1.5305)


@cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    # A SentencePiece-style Unigram vocabulary, written rather than trained (Unigram training on a
    # templated corpus collapses to characters): "▁" marks a word start; whole words outscore any
    # split, rare words weakly; every printable ASCII character, word-initial or not, is a fallback.
    # No lowercasing normaliser, as in T5: "Sks" is '▁S', 'k', 's' where "sks" is '▁sks'.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + w, -6.0) for w in WORDS] + [("▁" + w.capitalize(), -7.0) for w in WORDS]
    pieces += [("▁" + w, -11.0) for w in RARE]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [("▁" + c, -12.0) for c in chars] + [(c, -13.0) for c in chars]
    unique: dict[str, float] = {}
    for piece, score in pieces:  # "▁a" is a word and a character: keep its first (word) score
        unique.setdefault(piece, score)
    return tuple(unique.items())


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A case-sensitive T5 tokenizer (tokenizers-library Unigram, '</s>' appended, 100 sentinels), built
    offline.

    transformers 5's T5Tokenizer (T5TokenizerFast is the same class) takes the Unigram pieces as
    `vocab=[(piece, log_prob), ...]` and builds the Metaspace pre-tokenizer and the '</s>' post-processor
    itself.
    """
    return T5TokenizerFast(vocab=list(_t5_vocab()), model_max_length=512)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder (gated GELU, as the T5-XXL of FLUX and SD3)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _tiny_vae(latent: dict[str, float]):
    """A 16-channel AutoencoderKL with 4 blocks (8x downsampling) and no quant convs, as FLUX.1's and
    SD3's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=TINY_RESOLUTION,
        use_quant_conv=False, use_post_quant_conv=False, **latent,
    )


def build_tiny_flux(path: Path, *, seed: int = 0) -> Path:
    """Save a tiny FLUX.1-dev pipeline (64x64 pixels, 16x8x8 latents packed into 4x4 tokens of 64) in
    diffusers format.

    What matters of the real one: a CLIP text model whose pooled output (768 wide there, 32 here)
    conditions every block, and a T5 encoder (case-sensitive tokenizer) whose sequence is the joint
    attention's text stream; double- and single-stream blocks; the guidance embedding of
    FLUX.1-dev's distilled guidance; 3-axis RoPE summing to the head width; a VAE with shift and
    scale; a scheduler with FLUX.1's resolution-dependent shift.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer), seed)
    text_encoder_2 = tiny_t5_encoder(len(tokenizer_2), d_model=32, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    vae = _tiny_vae(FLUX1_VAE)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sd3(path: Path, *, seed: int = 0, dual_attention_layers: tuple[int, ...] = ()) -> Path:
    """Save a tiny SD3.5 pipeline (64x64 pixels, 16x8x8 latents in 2x2 patches) in diffusers format.

    What matters of the real one: CLIP-L and CLIP-G with text projections and different
    vocabularies and widths (32 and 48 here, 768 and 1280 there), whose projected pooled outputs
    are concatenated (pooled_projection_dim = 32 + 48) and whose penultimate states, concatenated
    and zero-padded to T5's width, precede T5's sequence; RMS q/k norms (SD3.5);
    `dual_attention_layers` gives SD3.5 Medium's MMDiT-X blocks; a VAE with shift and scale; a
    scheduler with a static shift of 3.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2, tokenizer_3 = (
        tiny_clip_tokenizer(0), tiny_clip_tokenizer(1, pad_token="!"), tiny_t5_tokenizer(),
    )
    encoders = []
    for i, (tok, width) in enumerate(((tokenizer, 32), (tokenizer_2, 48))):
        torch.manual_seed(seed + i)
        config = CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=width, hidden_act=("quick_gelu", "gelu")[i],
        )
        encoders.append(CLIPTextModelWithProjection(config))
    # >= 32 + 48: CLIP states are padded to it
    text_encoder_3 = tiny_t5_encoder(len(tokenizer_3), d_model=96, seed=seed + 2)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=32, pooled_projection_dim=32 + 48, pos_embed_max_size=16, qk_norm="rms_norm",
        dual_attention_layers=dual_attention_layers,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
        vae=_tiny_vae(SD35_VAE), text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return path
