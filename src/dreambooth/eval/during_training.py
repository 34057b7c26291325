"""Evaluation while training: the paper's metrics on fresh samples at chosen steps.

The pretrained model's samples (the same prompts without the identifier, and "a [class noun]")
are made once, before the stage trains: they are the baseline of the context flags and of the
prior-collapse guard (PRES may not rise more than a margin above the pretrained model's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from dreambooth.config import EvalConfig
from dreambooth.eval.embedders import EmbeddingCache
from dreambooth.eval.evaluate import ScoringModels, load_scorers
from dreambooth.eval.prompts import strip_identifier
from dreambooth.eval.scoring import METRICS, Embedders, Samples, Scores, SubjectPhotos, score_subject
from dreambooth.generate import expand_prompts, generate

logger = logging.getLogger(__name__)


def load_eval_embedders(cfg: EvalConfig, model_source: str, device: str) -> Embedders:
    """The model's own scorers if it ships them and `cfg.embedders` is 'auto'; else DINO, CLIP and LPIPS."""
    return load_scorers(ScoringModels.of(cfg), device, model_source=model_source)


@dataclass(frozen=True)
class BestCheckpointPolicy:
    """Which evaluated weights are the best of a stage: highest `metric`, unless the class prior collapsed.

    Called by the training loop with the scores :class:`TrainingEvaluator` returns.
    """

    metric: str
    """A metric of :data:`~dreambooth.eval.scoring.METRICS` (higher is better), e.g. 'dino'."""
    max_pres_increase: float = 0.1
    """Prior-collapse guard: weights whose PRES exceeds the pretrained model's by more are never the best."""

    def __call__(self, scores: dict[str, float], best: dict[str, float] | None, step: int) -> bool:
        pres, baseline = scores.get("eval/pres"), scores.get("eval/pres_pretrained")
        if pres is not None and baseline is not None and pres > baseline + self.max_pres_increase:
            logger.warning(
                "step %d: PRES %.3f is more than %.2f above the pretrained model's %.3f: the class prior is "
                "collapsing "
                "onto the subject (language drift); this checkpoint cannot be the best", step, pres,
                self.max_pres_increase, baseline,
            )
            return False
        key = f"eval/{self.metric}"
        value = scores.get(key)
        return value is not None and (best is None or value > best.get(key, float("-inf")))


@dataclass
class TrainingEvaluator:
    """Samples the validation prompts through `pipelines` and scores them against the subject."""

    pipelines: list
    guidance: list[float]
    subject: SubjectPhotos
    identifier: str
    prompts: list[str]
    """Prompts with the identifier filled in."""
    embedders: Embedders
    num_images: int = 4
    steps: int = 25
    seed: int = 0
    autocast_dtype: torch.dtype | None = None
    cache: EmbeddingCache = field(default_factory=EmbeddingCache)
    pretrained: Samples | None = None

    @property
    def class_prompt(self) -> str:
        return f"a {self.subject.class_noun}"

    def record_baseline(self) -> Scores:
        """Sample and score the model before this stage trains; returns its row."""
        plain = [strip_identifier(p, self.identifier) for p in self.prompts]
        by_prompt, class_samples = self._sample(plain)
        self.pretrained = Samples("Pretrained", by_prompt, None, class_samples)
        return score_subject(
            self.subject, [], self.embedders, pretrained=self.pretrained, cache=self.cache
        ).rows[-1]

    def __call__(self, step: int) -> dict[str, float]:
        """The fine-tuned model's metrics now, as 'eval/<metric>' (and the pretrained PRES for the guard)."""
        by_prompt, class_samples = self._sample(self.prompts)
        samples = Samples(f"step {step}", by_prompt, self.identifier, class_samples)
        result = score_subject(
            self.subject, [samples], self.embedders, pretrained=self.pretrained, cache=self.cache
        )
        row = result.rows[-1]
        scores = {f"eval/{name}": getattr(row, name) for name in METRICS if getattr(row, name) is not None}
        if self.pretrained is not None and result.rows[1].pres is not None:
            scores["eval/pres_pretrained"] = result.rows[1].pres
        return scores

    def _sample(self, prompts: Sequence[str]) -> tuple[dict[str, list[Image.Image]], list[Image.Image]]:
        everything = [*prompts, self.class_prompt]
        images = generate(
            self.pipelines, *expand_prompts(everything, self.num_images, self.seed), steps=self.steps,
            guidance=self.guidance, autocast_dtype=self.autocast_dtype,
        )
        groups = [images[i * self.num_images : (i + 1) * self.num_images] for i in range(len(everything))]
        return dict(zip(prompts, groups[:-1])), groups[-1]
