"""The rectified-flow objective of SD3 / SD3.5 and FLUX.1.

Implements Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis" (arXiv:2403.03206). A level is sigma, the fraction of noise:

    x_t = (1 - sigma) x0 + sigma eps,    target v = eps - x0    (Sec. 3, "rectified flow")

sigma is drawn per row from a density over (0, 1) (Sec. 3.1; u ~ U[0, 1), n ~ N(0, 1)):

    uniform        sigma = u
    logit_normal   sigma = sigmoid(m + s n)
    mode           sigma = 1 - u - c (cos^2(pi u / 2) - 1 + u),   -1 <= c <= 2 / (pi - 2)

then shifted towards noise, as the model's scheduler shifts its sampling schedule:

    static (SD3)    sigma' = a sigma / (1 + (a - 1) sigma)           (Sec. 5.3.2; a = 3.0 for SD3.5)
    dynamic (FLUX)  sigma' = e^mu / (e^mu + 1 / sigma - 1),  mu linear in the image's token count

(the static shift is the dynamic one with mu = log a). Each sample's squared error is weighed by
none: 1, sigma_sqrt: sigma^-2, or cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2)). The densities and
weights are those of diffusers' `training_utils.compute_density_for_timestep_sampling` and
`compute_loss_weighting_for_sd3`, computed from each row's own generator.

Defaults: logit-normal(0, 1) with weight 1 is the paper's rf/lognorm(0.00, 1.00), the best-ranked
variant of its Sec. 5.1 study, and what diffusers' SD3 DreamBooth scripts train with
(`--weighting_scheme logit_normal`, which selects that density and, not being a weighting, weight
1). diffusers' FLUX DreamBooth scripts default to `none`: uniform sigma, weight 1. mode_scale 1.29
is the paper's rf/mode(1.29) and diffusers' default. Where diffusers' scripts differ: they round
sigma to the scheduler's 1000-step grid and read it backwards (sigma ~ 1 - u, which flips the sign
of logit_mean; the other densities are symmetric about 1/2), and their FLUX scripts train on
unshifted sigmas (a scheduler with `use_dynamic_shifting` shifts only when sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from dreambooth.seeding import RowRandom

SIGMA_MIN = 1e-6
"""Levels are raised to at least this: u = 0 (torch.rand can return it) would make x_t = x0
and the sigma_sqrt weight infinite."""

MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))
"""mode_scale values for which the mode density's map u -> sigma is monotonic (Sec. 3.1)."""


def _uniform(objective: FlowMatchingObjective, rng: RowRandom) -> Tensor:
    return rng.rand()


def _logit_normal(objective: FlowMatchingObjective, rng: RowRandom) -> Tensor:
    return torch.sigmoid(objective.logit_mean + objective.logit_std * rng.randn(()))


def _mode(objective: FlowMatchingObjective, rng: RowRandom) -> Tensor:
    u = rng.rand()
    return 1 - u - objective.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


DENSITIES: Mapping[str, Callable[[FlowMatchingObjective, RowRandom], Tensor]] = {
    "uniform": _uniform, "logit_normal": _logit_normal, "mode": _mode,
}
"""How an unshifted sigma [b] is drawn, by density name."""

WEIGHTINGS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "none": lambda sigma: torch.ones_like(sigma),
    "sigma_sqrt": lambda sigma: sigma**-2.0,
    "cosmap": lambda sigma: 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)),
}
"""Per-sample loss weight of a float32 sigma [b], by weighting name."""


def image_seq_len(latent_shape: tuple[int, ...] | torch.Size, patch_size: int = 2) -> int:
    """Number of image tokens of a latent [..., h, w] cut into patch_size x patch_size patches.

    FLUX packs 2x2 latent pixels per token, so a 512 px image (a 64x64 latent) has 1024 tokens.
    """
    h, w = latent_shape[-2:]
    return (h // patch_size) * (w // patch_size)


@dataclass(frozen=True)
class DynamicShift:
    """FLUX's resolution-dependent shift: mu linear in the image's token count.

    The defaults are FlowMatchEulerDiscreteScheduler's and FLUX.1's (its scheduler config).
    """

    base_seq_len: int = 256
    """Token count at which mu = base_shift (a 256 px FLUX image)."""
    max_seq_len: int = 4096
    """Token count at which mu = max_shift (a 1024 px FLUX image); mu extrapolates beyond both ends."""
    base_shift: float = 0.5
    max_shift: float = 1.15
    patch_size: int = 2
    """Latent pixels per token side (FLUX packs 2x2)."""

    def __post_init__(self) -> None:
        if self.max_seq_len <= self.base_seq_len:
            raise ValueError(
                f"dynamic shift needs max_seq_len > base_seq_len, got {self.max_seq_len} <= "
                f"{self.base_seq_len}"
            )
        if self.patch_size <= 0:
            raise ValueError(f"dynamic shift patch_size must be > 0, got {self.patch_size}")

    def mu(self, seq_len: int) -> float:
        """mu at `seq_len` image tokens, as diffusers' `pipeline_flux.calculate_shift` computes it."""
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        b = self.base_shift - m * self.base_seq_len
        return seq_len * m + b


@dataclass(frozen=True)
class FlowMatchingObjective:
    """Rectified flow: noise levels sigma in (0, 1], x_t = (1 - sigma) x0 + sigma eps, velocity target eps -
    x0."""

    density: str = "logit_normal"
    """How sigma is drawn: 'uniform', 'logit_normal' or 'mode'."""
    logit_mean: float = 0.0
    """Mean m of the logit-normal density (positive: more noise)."""
    logit_std: float = 1.0
    """Standard deviation s of the logit-normal density."""
    mode_scale: float = 1.29
    """Scale c of the mode density (0: uniform; larger: more mass at mid levels)."""
    weighting: str = "none"
    """Per-sample loss weight: 'none', 'sigma_sqrt' (sigma^-2) or 'cosmap'."""
    shift: float = 1.0
    """Static shift a (1: none); ignored when `dynamic_shift` is set, as by the scheduler."""
    dynamic_shift: DynamicShift | None = None
    """FLUX's resolution-dependent shift, or None for the static one."""
    num_train_timesteps: int = 1000
    """The scheduler's timestep scale: `timestep(sigma)` = sigma * num_train_timesteps."""

    def __post_init__(self) -> None:
        if self.density not in DENSITIES:
            raise ValueError(f"flow-matching density {self.density!r} is not one of {sorted(DENSITIES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"flow-matching weighting {self.weighting!r} is not one of {sorted(WEIGHTINGS)}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        low, high = MODE_SCALE_RANGE
        if self.density == "mode" and not low <= self.mode_scale <= high:
            raise ValueError(
                f"mode_scale must lie in [{low}, {high:.4f}] for the mode density, got {self.mode_scale}"
            )
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    @classmethod
    def from_scheduler_config(
        cls, config: Mapping, *, density: str = "logit_normal", logit_mean: float = 0.0,
        logit_std: float = 1.0, mode_scale: float = 1.29, weighting: str = "none", patch_size: int = 2,
    ) -> FlowMatchingObjective:
        """The objective of a model whose sampler is a diffusers FlowMatchEulerDiscreteScheduler.

        Args:
            config: The scheduler's config (`scheduler.config` or its scheduler_config.json as a dict):
                `shift`, or `use_dynamic_shifting` with `base_shift`, `max_shift`, `base_image_seq_len`
                and `max_image_seq_len`; missing keys take the scheduler's defaults.
            density, logit_mean, logit_std, mode_scale, weighting: As the fields of this class.
            patch_size: Latent pixels per token side, for the dynamic shift's token count.

        Returns:
            The objective, with the scheduler's shift applied to every drawn sigma.

        Raises:
            ValueError: The config is not a flow-matching scheduler's, or asks for a shift this
                objective does not implement (`time_shift_type` 'linear').
        """
        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if not name.startswith("FlowMatch"):
            raise ValueError(
                f"scheduler config is a {name}'s, not a flow-matching scheduler's: the model is not a "
                "rectified-flow model"
            )
        dynamic = None
        if config.get("use_dynamic_shifting", False):
            if config.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(
                    f"scheduler time_shift_type {config['time_shift_type']!r} is not supported; "
                    "only 'exponential' (FLUX.1's) is"
                )
            keys = {
                "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
            }
            values = {k: config.get(k, default) for k, default in keys.items()}
            if missing := [k for k, v in values.items() if v is None]:
                raise ValueError(
                    f"scheduler config uses dynamic shifting but sets {', '.join(missing)} to null"
                )
            dynamic = DynamicShift(
                base_seq_len=values["base_image_seq_len"], max_seq_len=values["max_image_seq_len"],
                base_shift=values["base_shift"], max_shift=values["max_shift"], patch_size=patch_size,
            )
        return cls(
            density=density, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
            weighting=weighting, shift=float(config.get("shift", 1.0)), dynamic_shift=dynamic,
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )

    def draw_levels(self, rng: RowRandom, x0: Tensor) -> Tensor:
        """sigma [b] (float32) from each row's generator; x0 [b, c, h, w] sets the dynamic shift's token
        count."""
        sigma = self.shifted(DENSITIES[self.density](self, rng), x0.shape)
        return sigma.clamp(min=SIGMA_MIN)

    def shifted(self, sigma: Tensor, latent_shape: tuple[int, ...] | torch.Size) -> Tensor:
        """sigma moved towards noise by the static or dynamic shift (the scheduler's formulas)."""
        if self.dynamic_shift is not None:
            e_mu = math.exp(self.dynamic_shift.mu(image_seq_len(latent_shape, self.dynamic_shift.patch_size)))
            return e_mu / (e_mu + (1 / sigma - 1))
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def noisy(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        sigma = _per_row(level, x0)
        return sigma * noise + (1.0 - sigma) * x0

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        return noise - x0

    def weight(self, level: Tensor) -> Tensor:
        return WEIGHTINGS[self.weighting](level.float())

    def level_fraction(self, level: Tensor) -> Tensor:
        return level.float()

    def timestep(self, level: Tensor) -> Tensor:
        """sigma on the scheduler's timestep scale (sigma * 1000): SD3's transformer takes this; FLUX's takes
        sigma."""
        return level * self.num_train_timesteps


def _per_row(level: Tensor, x: Tensor) -> Tensor:
    """Levels [b] as [b, 1, ..., 1] in x's dtype, to broadcast over a batch x [b, ...]."""
    return level.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
