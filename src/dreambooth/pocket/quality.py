"""Is the pretrained pocket cascade good enough to demonstrate DreamBooth? (`dreambooth pocket quality`)

- Base stage: one prompt per (class, context) pair, "a <class> <context phrase>", sampled with
  fixed seeds; the scorer reads each sample's class and context. The bar: >= 80% each.
- Super-resolution stage: real 64x64 renders are downsampled to 32x32 (as the base stage sees
  them) and super-resolved with their captions; the result is compared with the true render
  against plain bilinear upsampling, by PSNR and by the correlation of fine detail (the high-pass
  residual left after a sigma = 1 px blur, which is what 32x32 cannot carry). A generative SR
  stage invents plausible detail, so it can lose on PSNR while winning on detail. And whether it
  reads its input at all: its one-step clean estimate at t = 900, with the input and without.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth.data.images import pixels_to_tensor
from dreambooth.generate import LoadedModel, expand_prompts, generate, super_resolve
from dreambooth.models.deepfloyd_if import IFSuperResStage, downsample, upscale
from dreambooth.pocket._scorer_net import gaussian_blur
from dreambooth.pocket.scorers import PocketScorer
from dreambooth.pocket.world import CLASSES, CONTEXTS, sample_dataset


def base_accuracy(
    model: LoadedModel, scorer: PocketScorer, *, images_per_prompt: int = 2, steps: int = 20,
    guidance: float = 4.0, seed: int = 0,
) -> dict[str, float]:
    """Class and context accuracy of base-stage samples over every (class, context) prompt."""
    pairs = list(itertools.product(CLASSES, CONTEXTS))
    prompts, seeds = expand_prompts(
        [f"a {cls} {CONTEXTS[context]}" for cls, context in pairs], images_per_prompt, seed
    )
    images = generate(
        model.pipelines[:1], prompts, seeds, steps=steps, guidance=[guidance], batch_size=60,
        progress="base samples",
    )
    predicted = scorer.classify(images)
    wanted = [pair for pair in pairs for _ in range(images_per_prompt)]
    return {
        "class_accuracy": float(np.mean([p == w[0] for p, w in zip(predicted.cls, wanted)])),
        "context_accuracy": float(np.mean([p == w[1] for p, w in zip(predicted.context, wanted)])),
        "samples": len(images),
    }


@torch.no_grad()
def super_resolution_agreement(
    model: LoadedModel, *, n: int = 64, steps: int = 20, guidance: float = 4.0, seed: int = 1
) -> dict[str, float]:
    """SR of downsampled renders vs bilinear upsampling, against the true 64x64 renders."""
    renders, captions, _ = sample_dataset(n, seed + 10_000, p_drop=0.0)
    truth = pixels_to_tensor(renders)  # [n, 3, 64, 64]
    lowres = downsample(truth, model.pipelines[0].unet.config.sample_size)   # what the base stage makes
    super_resolved = super_resolve(
        model.pipelines[1], lowres, captions, steps=steps, guidance=guidance, seed=seed
    )
    bilinear = upscale(lowres, truth.shape[-1]).clamp(-1, 1)
    return {
        "psnr_sr": _psnr(super_resolved, truth), "psnr_bilinear": _psnr(bilinear, truth),
        "detail_corr_sr": _detail_correlation(super_resolved, truth),
        "detail_corr_bilinear": _detail_correlation(bilinear, truth),
    }


@torch.no_grad()
def super_resolution_reads_input(
    model: LoadedModel, *, n: int = 32, t: int = 900, noise_level: int = 250, seed: int = 2
) -> dict[str, float]:
    """PSNR of the SR stage's one-step clean estimate at timestep `t` against the true render.

    At high `t` the noisy target holds almost nothing, so the estimate is as good as the stage's
    use of its low-res input: a stage that reads it should at least match bilinear upsampling;
    with the input zeroed, the gap shows how much it relies on it.
    """
    sr = model.pipelines[1]
    stage = IFSuperResStage.from_pipeline(sr, low_resolution=model.pipelines[0].unet.config.sample_size)
    renders, captions, _ = sample_dataset(n, seed + 10_000, p_drop=0.0)
    truth = pixels_to_tensor(renders).to(sr.device)
    bilinear = upscale(downsample(truth, stage.low_resolution), truth.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    levels, steps = torch.full((n,), noise_level, device=sr.device), torch.full((n,), t, device=sr.device)
    condition = sr.image_noising_scheduler.add_noise(
        bilinear, torch.randn(bilinear.shape, generator=generator).to(sr.device), levels
    )
    noisy = sr.scheduler.add_noise(truth, torch.randn(truth.shape, generator=generator).to(sr.device), steps)
    text = stage.encode_text(stage.tokenize(captions)).sequence

    def estimate(low: torch.Tensor) -> torch.Tensor:
        prediction = stage.denoise(noisy, steps, text, low, levels)
        return sr.scheduler.step(prediction, t, noisy).pred_original_sample.clamp(-1, 1)

    return {
        f"psnr_estimate_t{t}": _psnr(estimate(condition), truth),
        f"psnr_estimate_t{t}_input_zeroed": _psnr(estimate(torch.zeros_like(condition)), truth),
        "psnr_bilinear": _psnr(bilinear.clamp(-1, 1), truth),
    }


def _psnr(x: torch.Tensor, truth: torch.Tensor) -> float:
    mse = ((x - truth) / 2).pow(2).flatten(1).mean(1)                        # images in [0, 1] scale
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def _detail_correlation(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean per-image correlation of the fine detail (x - blur(x)) with the truth's."""
    sigma = torch.ones(len(x))
    a, b = (x - gaussian_blur(x, sigma)).flatten(1), (truth - gaussian_blur(truth, sigma)).flatten(1)
    return float(F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1).mean())
