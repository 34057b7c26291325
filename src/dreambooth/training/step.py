"""The training step: the denoising loss of one batch, with the prior-preservation term.

Implements Eq. 2 of Ruiz et al. 2023: E[ w_t ||x_hat(a_t x + s_t eps, c) - x||^2
+ lambda w_t' ||x_hat(a_t' x_pr + s_t' eps', c_pr) - x_pr||^2 ], where the family's objective
says how levels t are drawn, how x is noised, what the denoiser predicts (epsilon, v, x0 or a
flow velocity) and the per-sample weight w_t. The step never asks which family it trains.
"""

from __future__ import annotations

from torch import Tensor

from dreambooth.data.training_set import Batch
from dreambooth.models.spec import Stage
from dreambooth.seeding import RowRandom


def compute_loss(stage: Stage, batch: Batch, prior_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one batch (instance rows, then class rows) and its per-sample terms.

    No optimizer, logging or I/O here; all randomness comes from the rows' own seeds.

    Returns:
        The scalar loss and per-sample terms: the weighted losses "loss/instance" [n_instance] and
        "loss/prior" [n_class], and the instance rows' noise levels as fractions of the noise
        range, "level/instance" [n_instance], for logging by level.
    """
    objective = stage.objective
    rng = RowRandom(batch.seeds, device=next(stage.denoiser.parameters()).device)
    x0 = stage.sample_x0(batch.encoded, rng)                                   # [b, c, h, w]
    noise = rng.randn(tuple(x0.shape[1:])).to(x0)
    level = objective.draw_levels(rng, x0)                                    # [b]
    noisy = objective.noisy(x0, noise, level)
    text = batch.text if batch.text is not None else stage.encode_text(batch.tokens)
    prediction = stage.predict(noisy, level, text, batch.encoded, rng)
    error = (prediction.float() - objective.target(x0, noise, level).float()).pow(2).flatten(1).mean(1)  # [b]
    instance, prior = split_rows(batch, objective.weight(level) * error)
    loss = instance.mean() + (prior_weight * prior.mean() if batch.n_class else 0.0)
    fraction = objective.level_fraction(level)
    return loss, {
        "loss/instance": instance.detach(), "loss/prior": prior.detach(),
        "level/instance": fraction[: batch.n_instance],
    }


def split_rows(batch: Batch, per_sample: Tensor) -> tuple[Tensor, Tensor]:
    """Split per-sample values [b] into the instance rows and the class (prior) rows."""
    instance, prior = per_sample.split([batch.n_instance, batch.n_class])
    return instance, prior
