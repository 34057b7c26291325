"""The rectified-flow objective: each density, shift and weighting against a hand computation and
diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dreambooth.models.flow_matching import DynamicShift, FlowMatchingObjective, image_seq_len
from dreambooth.seeding import RowRandom

from tiny_transformers import FLUX1_SCHEDULER, SD35_SCHEDULER

SEEDS = [3, 14, 15, 92, 65]
X0 = torch.zeros(len(SEEDS), 16, 8, 8)


def _uniforms(seeds=SEEDS) -> list[float]:
    """u ~ U[0, 1) as RowRandom draws it: one torch.rand from each row's own generator."""
    return [torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in seeds]


def _normals(seeds=SEEDS) -> list[float]:
    return [torch.randn((), generator=torch.Generator().manual_seed(s)).item() for s in seeds]


def _draw(objective: FlowMatchingObjective, x0: torch.Tensor = X0, seeds=SEEDS) -> torch.Tensor:
    return objective.draw_levels(RowRandom(seeds), x0[: len(seeds)])


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


def test_uniform_density_with_static_shift() -> None:
    expected = [3 * u / (1 + 2 * u) for u in _uniforms()]
    _close(_draw(FlowMatchingObjective(density="uniform", shift=3.0)), expected)


def test_logit_normal_density() -> None:
    expected = [1 / (1 + math.exp(-(0.5 + 0.8 * n))) for n in _normals()]
    _close(_draw(FlowMatchingObjective(density="logit_normal", logit_mean=0.5, logit_std=0.8)), expected)


def test_mode_density() -> None:
    s = 1.29
    expected = [1 - u - s * (math.cos(math.pi * u / 2) ** 2 - 1 + u) for u in _uniforms()]
    _close(_draw(FlowMatchingObjective(density="mode", mode_scale=s)), expected)


@pytest.mark.parametrize(
    ("density", "scheme"), [("uniform", "none"), ("logit_normal", "logit_normal"), ("mode", "mode")]
)
def test_densities_match_diffusers_given_the_rows_generator(density: str, scheme: str) -> None:
    objective = FlowMatchingObjective(density=density, logit_mean=0.3, logit_std=1.2, mode_scale=0.8)
    expected = [
        compute_density_for_timestep_sampling(
            scheme, 1, logit_mean=0.3, logit_std=1.2, mode_scale=0.8,
            generator=torch.Generator().manual_seed(s),
        ).item()
        for s in SEEDS
    ]
    _close(_draw(objective), expected)


def test_weightings() -> None:
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.9])
    expected = {
        "none": [1.0] * 4,
        "sigma_sqrt": [s**-2 for s in sigma.tolist()],
        "cosmap": [2 / (math.pi * (1 - 2 * s + 2 * s**2)) for s in sigma.tolist()],
    }
    for name, values in expected.items():
        weight = FlowMatchingObjective(weighting=name).weight(sigma)
        _close(weight, values)
        torch.testing.assert_close(weight, compute_loss_weighting_for_sd3(name, sigma).float())


def test_noisy_and_target() -> None:
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    level = torch.tensor([0.25, 0.75])
    objective = FlowMatchingObjective()
    noisy = objective.noisy(x0, noise, level)
    torch.testing.assert_close(noisy[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(noisy[1], 0.25 * x0[1] + 0.75 * noise[1])
    torch.testing.assert_close(objective.target(x0, noise, level), noise - x0)
    assert objective.noisy(x0.bfloat16(), noise.bfloat16(), level).dtype == torch.bfloat16


# 512 px and 1024 px FLUX images
@pytest.mark.parametrize(("latent_side", "tokens"), [(64, 1024), (128, 4096)])
def test_flux_dynamic_shift(latent_side: int, tokens: int) -> None:
    objective = FlowMatchingObjective.from_scheduler_config(FLUX1_SCHEDULER, density="uniform")
    assert image_seq_len((1, 16, latent_side, latent_side)) == tokens
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    assert objective.dynamic_shift.mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)
    assert mu == pytest.approx(calculate_shift(tokens), abs=1e-12)
    expected = [math.exp(mu) / (math.exp(mu) + 1 / u - 1) for u in _uniforms()]
    sigma = _draw(objective, torch.zeros(len(SEEDS), 16, latent_side, latent_side))
    _close(sigma, expected)

    # the sampler shifts its own schedule identically
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER)
    scheduler.set_timesteps(sigmas=_uniforms(), mu=mu)
    _close(sigma, scheduler.sigmas[:-1].tolist())


def test_sd35_static_shift_matches_the_scheduler() -> None:
    objective = FlowMatchingObjective.from_scheduler_config(SD35_SCHEDULER, density="uniform")
    assert objective.shift == 3.0 and objective.dynamic_shift is None
    scheduler = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER)
    scheduler.set_timesteps(sigmas=_uniforms())
    _close(_draw(objective), scheduler.sigmas[:-1].tolist())


def test_static_shift_is_the_dynamic_shift_at_mu_log_shift() -> None:
    sigma = torch.tensor([0.1, 0.5, 0.9])
    static = FlowMatchingObjective(shift=3.0).shifted(sigma, X0.shape)
    tokens = image_seq_len(X0.shape)
    at_log_3 = DynamicShift(base_seq_len=0, max_seq_len=tokens, base_shift=0.0, max_shift=math.log(3.0))
    dynamic = FlowMatchingObjective(dynamic_shift=at_log_3)
    torch.testing.assert_close(dynamic.shifted(sigma, X0.shape), static)


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_a_rows_level_depends_only_on_its_seed(density: str) -> None:
    objective = FlowMatchingObjective.from_scheduler_config(FLUX1_SCHEDULER, density=density)
    alone = _draw(objective, seeds=[15])
    in_batch = _draw(objective, seeds=[92, 15, 3])
    assert in_batch[1] == alone[0] and in_batch[0] != in_batch[2]


def test_levels_lie_in_the_unit_interval_and_scale_to_timesteps() -> None:
    objective = FlowMatchingObjective(density="mode", shift=3.0)
    sigma = objective.draw_levels(RowRandom(list(range(500))), torch.zeros(500, 16, 8, 8))
    assert sigma.dtype == torch.float32 and (sigma > 0).all() and (sigma <= 1).all()
    torch.testing.assert_close(objective.level_fraction(sigma), sigma)
    torch.testing.assert_close(objective.timestep(sigma), sigma * 1000)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="density 'beta'"):
        FlowMatchingObjective(density="beta")
    with pytest.raises(ValueError, match="weighting"):
        FlowMatchingObjective(weighting="snr")
    with pytest.raises(ValueError, match="mode_scale"):
        FlowMatchingObjective(density="mode", mode_scale=2.0)
    with pytest.raises(ValueError, match="not a flow-matching"):
        FlowMatchingObjective.from_scheduler_config({
            "_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
        })
    with pytest.raises(ValueError, match="time_shift_type 'linear'"):
        FlowMatchingObjective.from_scheduler_config({**FLUX1_SCHEDULER, "time_shift_type": "linear"})
