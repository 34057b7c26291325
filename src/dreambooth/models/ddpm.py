"""The discrete-time DDPM objective (Ho et al. 2020) shared by Stable Diffusion, SDXL and IF.

Levels are integer timesteps drawn uniformly from [0, T); x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps;
the target follows the scheduler's `prediction_type` (epsilon, v or x0); every sample weighs 1,
as the DreamBooth paper trains (w_t = 1 in its Eq. 2, in practice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from dreambooth.seeding import RowRandom


@dataclass(frozen=True)
class DDPMObjective:
    """The denoising objective of a DDPM noise schedule (`scheduler` carries betas and prediction_type)."""

    scheduler: DDPMScheduler

    @classmethod
    def from_config(cls, config) -> DDPMObjective:
        """From any diffusers scheduler config of the model (its sampler's), keeping its schedule."""
        return cls(DDPMScheduler.from_config(config))

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def draw_levels(self, rng: RowRandom, x0: Tensor) -> Tensor:
        return rng.randint(0, self.num_timesteps)

    def noisy(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, level)

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        return training_target(self.scheduler, x0, noise, level)

    def weight(self, level: Tensor) -> Tensor:
        return torch.ones(level.shape, device=level.device)

    def level_fraction(self, level: Tensor) -> Tensor:
        return level.float() / self.num_timesteps


def training_target(noise_scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the denoiser must predict: follows the scheduler's `prediction_type`."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")


def without_learned_variance(scheduler):
    """`scheduler`, sampling with fixed variance if it used the model's learned variance.

    DreamBooth trains the prediction channels only: a fine-tuned stage's variance channels are
    untrained and drift with the shared output layer, so it samples with `fixed_small`.
    """
    if scheduler.config.get("variance_type") not in ("learned", "learned_range"):
        return scheduler
    return type(scheduler).from_config({**scheduler.config, "variance_type": "fixed_small"})
