"""A Stable Diffusion 1.5 pipeline folder with the published architecture and random weights, built offline.

Run: python bench/full_size_sd15.py OUT_FOLDER [--dtype fp16]   (about 1 minute and 2.1 GB in fp16)

Speed and memory do not depend on the weights, so the GPU workloads of the performance issue (W1,
W3) run on this folder with no download: the UNet (859.5 M parameters), the VAE (83.7 M) and the
CLIP ViT-L/14 text encoder (123.1 M, its 49,408-row embedding) from their published configs, the
DDPM noise schedule SD 1.5 trains with and its PNDM sampler. The tokenizer is the only part that
cannot be derived offline: a small CLIP BPE vocabulary (tests/tiny_models.py) whose ids index the
full embedding; every prompt is still 77 tokens, so the text encoder's cost is the real one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_clip_tokenizer  # noqa: E402

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1,
    pad_token_id=1,
)
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)
PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
"""The published checkpoints' parameter counts: the architecture is checked against them."""


def build_sd15(out: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write the pipeline folder to `out` (weights in `dtype`); return `out`."""
    torch.manual_seed(seed)
    parts = {
        "unet": UNet2DConditionModel(**UNET), "vae": AutoencoderKL(**VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT)),
    }
    for name, module in parts.items():
        count = sum(p.numel() for p in module.parameters())
        assert count == PARAMETERS[name], f"{name}: {count:,} parameters, the published {PARAMETERS[name]:,}"
    pipe = StableDiffusionPipeline(
        **{name: module.to(dtype) for name, module in parts.items()}, tokenizer=tiny_clip_tokenizer(),
        scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    args = parser.parse_args()
    started = time.perf_counter()
    build_sd15(args.out, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
    print(f"SD 1.5 architecture, random weights, in {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
