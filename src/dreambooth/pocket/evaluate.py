"""What DreamBooth should achieve, measured on pocket images with the world's own scorers.

The paper's Table 3 in miniature, for one model on one subject:

- subject fidelity: mean cosine between the scorer's appearance embeddings of "a [V] [class]
  <context>" samples and of the subject photos (the paper's DINO, with a world-aware embedder);
- subject recognised: share of those samples that the scorer calls the subject;
- context accuracy: share of context prompts whose samples show the prompted context (the
  paper's "prompted context not generated" failure mode, counted);
- for "a [class]" samples: class accuracy, appearance diversity, and the share that look like
  the subject (language drift; lower is better; the paper's PRES);
- fine detail (64x64 only): the scorer's glyph score of subject samples, which only a
  personalised super-resolution stage can raise; and, to measure the SR stage apart from the
  base stage (whose 32x32 samples may not even place the badge right), the glyph score of true
  renders of the subject in every context, downsampled to 32x32 and super-resolved
  (`super_resolved_detail`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from PIL import Image

from dreambooth.data.images import pixels_to_tensor
from dreambooth.eval.metrics import mean_cross_cosine
from dreambooth.generate import super_resolve
from dreambooth.models.deepfloyd_if import downsample, upscale
from dreambooth.pocket.scorers import PocketScorer
from dreambooth.pocket.subjects import Subject
from dreambooth.pocket.world import CONTEXTS, N_VARIANTS, POSITIONS, VIEWS, render

LABELS = {
    "subject_fidelity": "subject fidelity (cos to photos)",
    "subject_recognised": "subject recognised",
    "context_accuracy": "prompted context present",
    "class_accuracy": "'a [class]': class correct",
    "class_diversity": "'a [class]': diversity",
    "drift": "'a [class]': look like the subject (lower is better)",
    "detail": "fine detail at 64x64 (glyph score)",
}


@dataclass(frozen=True)
class PocketScores:
    subject_fidelity: float
    subject_recognised: float
    context_accuracy: float
    class_accuracy: float
    class_diversity: float
    drift: float
    detail: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def prompt_context(prompt: str) -> str | None:
    """The world context a prompt asks for (by its caption phrase), or None."""
    for name, phrase in CONTEXTS.items():
        if prompt.endswith(phrase):
            return name
    return None


def score_model(
    scorer: PocketScorer, subject: Subject, photos: Sequence[Image.Image],
    by_prompt: Mapping[str, Sequence[Image.Image]], class_samples: Sequence[Image.Image],
) -> PocketScores:
    """Score one model's subject samples (by prompt) and its "a [class]" samples."""
    subject_images = [im for images in by_prompt.values() for im in images]
    context_hits = []
    for prompt, images in by_prompt.items():
        wanted = prompt_context(prompt)
        if wanted is not None:
            context_hits += [predicted == wanted for predicted in scorer.classify(images).context]
    full_res = all(im.width == 64 for im in subject_images)
    predicted_class = scorer.classify(class_samples).cls
    return PocketScores(
        subject_fidelity=mean_cross_cosine(scorer.embed(subject_images), scorer.embed(photos)),
        subject_recognised=float(scorer.is_subject(subject_images, subject).float().mean()),
        context_accuracy=sum(context_hits) / max(len(context_hits), 1),
        class_accuracy=sum(c == subject.cls for c in predicted_class) / len(predicted_class),
        class_diversity=scorer.diversity(class_samples),
        drift=float(scorer.is_subject(class_samples, subject).float().mean()),
        detail=float(scorer.detail_score(subject_images, subject).mean()) if full_res else None,
    )


def super_resolved_detail(
    scorer: PocketScorer, subject: Subject, identifier: str, sr_stages: Mapping[str, object], *,
    low_resolution: int = 32, steps: int = 12, seed: int = 0,
) -> dict[str, float]:
    """Glyph score of the subject's true renders super-resolved by each SR stage (and bilinearly).

    The renders show the subject in every context, in both views, positions and backdrops
    cycling; each is downsampled to `low_resolution` and super-resolved with the prompt
    "a [V] [class] <context>". A true render scores 1.0.
    """
    positions = list(POSITIONS)
    scenes = [subject.scene(context, positions[k % len(positions)], view, k % N_VARIANTS)
              for k, (context, view) in enumerate((c, v) for c in CONTEXTS for v in VIEWS)]
    truth = pixels_to_tensor(render(scenes))
    lowres = downsample(truth, low_resolution)
    prompts = [f"a {identifier} {subject.cls} {CONTEXTS[scene.context]}" for scene in scenes]
    outputs = {
        name: super_resolve(sr, lowres, prompts, steps=steps, seed=seed) for name, sr in sr_stages.items()
    }
    outputs["bilinear"] = upscale(lowres, truth.shape[-1]).clamp(-1, 1)
    as_8bit = lambda x: ((x + 1) * 127.5).round() / 255  # noqa: E731  [-1, 1] -> [0, 1], quantised as saved images are
    return {
        name: float(scorer.detail_score(as_8bit(images), subject).mean()) for name, images in outputs.items()
    }


def format_table(columns: Mapping[str, PocketScores]) -> str:
    """A text table: one row per metric, one column per model."""
    names = list(columns)
    width = max(len(label) for label in LABELS.values())
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>14}" for n in names)]
    for key, label in LABELS.items():
        cells = []
        for name in names:
            value = getattr(columns[name], key)
            cells.append(f"{value:>14.3f}" if value is not None else f"{'-':>14}")
        lines.append(f"{label:{width}}  " + "  ".join(cells))
    return "\n".join(lines)
