"""The training step: the denoising loss of one batch, with the prior-preservation term.

Implements Eq. 2 of Ruiz et al. 2023: E[ w_t ||x_hat(a_t x + s_t eps, c) - x||^2
+ lambda w_t' ||x_hat(a_t' x_pr + s_t' eps', c_pr) - x_pr||^2 ], with the target following the
model's parameterisation (epsilon, v or x0) and w_t = 1 as in practice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreambooth.data.training_set import Batch
from dreambooth.models.spec import Stage, training_target
from dreambooth.seeding import RowRandom


def compute_loss(stage: Stage, batch: Batch, prior_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one batch (instance rows, then class rows) and its per-sample terms.

    No optimizer, logging or I/O here; all randomness comes from the rows' own seeds.

    Returns:
        The scalar loss and per-sample terms: "loss/instance" [n_instance], "loss/prior" [n_class]
        and the instance rows' timesteps "t/instance" [n_instance], for logging by timestep.
    """
    rng = RowRandom(batch.seeds, device=_device(stage))
    x0 = stage.sample_x0(batch.encoded, rng)                                   # [b, c, h, w]
    noise = rng.randn(tuple(x0.shape[1:])).to(x0)
    t = rng.randint(0, stage.noise_scheduler.config.num_train_timesteps)       # [b]
    noisy = stage.noise_scheduler.add_noise(x0, noise, t)
    text = batch.text if batch.text is not None else stage.encode_text(batch.tokens)
    prediction = stage.predict(noisy, t, text, batch.encoded, rng)
    target = training_target(stage.noise_scheduler, x0, noise, t)
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)  # [b]
    instance, prior = per_sample.split([batch.n_instance, batch.n_class])
    loss = instance.mean() + (prior_weight * prior.mean() if batch.n_class else 0.0)
    return loss, {"loss/instance": instance.detach(), "loss/prior": prior.detach(), "t/instance": t[: batch.n_instance]}


def _device(stage: Stage) -> torch.device:
    return next(stage.unet.parameters()).device
