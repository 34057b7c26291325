"""The pocket cascade: a tokenizer, a small T5 text encoder, and base + super-resolution pixel UNets.

It is a miniature of DeepFloyd IF (itself a public Imagen): the same diffusers classes and
pipelines (`IFPipeline`, `IFSuperResolutionPipeline`), at 32x32 -> 64x64, so the trainer
personalises it through the very code path that personalises real IF cascades.

- Tokenizer: BPE trained on the world's captions plus ~20k English words (wordfreq), so most
  of its 8192 tokens never occur in a training caption: the rare tokens an identifier is drawn
  from, as in the paper.
- UNets: IF's layout (ResNet blocks with scale-shift time conditioning, "simple" cross-attention
  that attends over image and text tokens together, and the pooled text embedding added to the
  timestep embedding, `addition_embed_type="text"`), which carries whole-image properties such as
  the context. Outputs are 6 channels (epsilon + variance) as IF pipelines expect; the schedulers
  use fixed variance, so only the first half is trained and sampled.
- Parameterisation: both stages predict v (IF predicts epsilon): v weighs an image's x0 error by
  SNR + 1, so the high noise levels where the layout and the context are decided keep their
  gradient (epsilon weighs them by the SNR, which vanishes there).
- Normalisation: GroupNorm groups sized for these narrow widths (diffusers' default of 32 groups
  assumes hundreds of channels; one channel per group would erase each channel's per-image mean,
  the colour an SR stage must copy from its input).

How these choices were found, with the figures, is in docs/pocket.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from dreambooth.files import with_usual_permissions
from dreambooth.layout import CASCADE_STAGE_DIRS
from dreambooth.models.deepfloyd_if import NO_SAFETY
from dreambooth.pocket.world import sample_dataset

VOCAB_SIZE = 8192
MAX_LENGTH = 77  # IFPipeline pads prompts to 77 tokens


@dataclass(frozen=True)
class PocketArchitecture:
    """Sizes of the pocket cascade (kept small enough to pretrain on 2 CPU cores)."""

    base_resolution: int = 32
    sr_resolution: int = 64
    text_width: int = 128
    text_layers: int = 2
    base_channels: tuple[int, ...] = (32, 64, 128)
    sr_channels: tuple[int, ...] = (16, 32, 64, 128)
    head_dim: int = 32
    base_norm_groups: int = 16
    """GroupNorm groups of the base: 2 channels per group at its 32-channel top level, as the committed
    base was pretrained (docs/pocket.md has the measurements behind the group counts)."""
    sr_norm_groups: int = 4
    """GroupNorm groups of the SR stage: 4 channels per group at its 16-channel top level, so no norm is an
    instance norm, which would erase each channel's per-image mean: the colour an SR stage must copy
    from its input (docs/pocket.md)."""
    english_words: int = 20000


def build_tokenizer(
    arch: PocketArchitecture = PocketArchitecture(), seed: int = 0
) -> PreTrainedTokenizerFast:
    """A lower-cased word-piece BPE tokenizer over world captions + common English words."""
    from wordfreq import top_n_list

    english = [w for w in top_n_list("en", arch.english_words) if w.isascii() and w.isalpha()]
    _, captions, _ = sample_dataset(2000, seed)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>"], end_of_word_suffix="</w>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"), show_progress=False,
    )
    tokenizer.train_from_iterator(english + captions, trainer)
    # as T5
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_LENGTH,
    )


def build_text_encoder(arch: PocketArchitecture, vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=arch.text_width, d_kv=arch.text_width // 4,
            d_ff=arch.text_width * 2, num_layers=arch.text_layers, num_heads=4, dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1,
        )
    )


def _unet(
    channels: tuple[int, ...], resolution: int, in_channels: int, attention_levels: int, norm_groups: int,
    arch: PocketArchitecture, **extra,
) -> UNet2DConditionModel:
    plain = len(channels) - attention_levels
    down = ("ResnetDownsampleBlock2D",) * plain + ("SimpleCrossAttnDownBlock2D",) * attention_levels
    up = ("SimpleCrossAttnUpBlock2D",) * attention_levels + ("ResnetUpsampleBlock2D",) * plain
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=in_channels, out_channels=6, block_out_channels=channels,
        layers_per_block=1, down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=channels[-1],
        encoder_hid_dim=arch.text_width, encoder_hid_dim_type="text_proj", addition_embed_type="text",
        addition_embed_type_num_heads=4, attention_head_dim=arch.head_dim,
        resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=norm_groups, **extra,
    )


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small",
        prediction_type=prediction_type,
    )


def build_cascade(out_dir: Path, arch: PocketArchitecture = PocketArchitecture(), seed: int = 0) -> Path:
    """Save a randomly initialised pocket cascade (stage_1/, stage_2/) in diffusers IF format."""
    tokenizer = build_tokenizer(arch, seed)
    torch.manual_seed(seed)
    base = IFPipeline(
        tokenizer=tokenizer, text_encoder=build_text_encoder(arch, len(tokenizer)),
        unet=_unet(arch.base_channels, arch.base_resolution, 3, 2, arch.base_norm_groups, arch),
        scheduler=_scheduler("v_prediction"), **NO_SAFETY,
    )
    sr = IFSuperResolutionPipeline(
        tokenizer=tokenizer, text_encoder=build_text_encoder(arch, len(tokenizer)),
        unet=_unet(
            arch.sr_channels, arch.sr_resolution, 6, 1, arch.sr_norm_groups, arch, class_embed_type="timestep"
        ),
        scheduler=_scheduler("v_prediction"), image_noising_scheduler=_scheduler(), **NO_SAFETY,
    )
    base.save_pretrained(out_dir / CASCADE_STAGE_DIRS["base"])
    sr.save_pretrained(out_dir / CASCADE_STAGE_DIRS["sr"])
    return with_usual_permissions(out_dir)
