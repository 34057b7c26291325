"""``dreambooth eval``: sample a model on DreamBench's prompts, with its pretrained base, and score both.

The fine-tuned model (a run folder, a diffusers folder, a hub id, or a base model plus a LoRA)
gets the paper's 25 prompts for its subject (object or live-subject list) and the prior prompt
"a [class noun]"; its pretrained base gets the same prompts without the identifier. Both rows,
and the real photos, are scored by :func:`~dreambooth.eval.scoring.score_subject` and written
by :func:`~dreambooth.eval.report.write_report`.

Layout of the output folder:

- ``samples/finetuned/``, ``samples/pretrained/``: the images, in the layout ``dreambooth
  generate`` writes: ``prompts.txt`` (one prompt per line), ``<prompt index>-<k>.png`` (image k
  of the prompt on line index, counted from 0, index written with at least 3 digits) and
  ``grid.png``. The prior prompt is the last line.
- ``metrics.json``, ``report.html``, ``images/``: the scores and the offline report.
- ``eval.json``: what was scored and how its images were sampled (written last: a folder
  with it holds a finished evaluation).

Existing images in that layout are scored as they are (``--images DIR``): every line of
``prompts.txt`` is a prompt; the line that reads "a [class noun]" gives the prior samples
(PRES, DIV (class)); other file names (``grid.png``) are ignored.

Choices the paper leaves open, made here:

- Image k of every prompt uses seed ``seed + k``, for the fine-tuned and the pretrained model
  alike, so that each before/after pair starts from the same noise.
- The prior prompt gets as many images as every other prompt (4 by default).
- The pretrained model is the run's base model (``model.source`` in its ``run.json``), or the
  base model of a LoRA, unless another is named or none is wanted.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dreambooth.config import ModelConfig
from dreambooth.data.images import load_images, open_image
from dreambooth.eval.embedders import EmbeddingCache
from dreambooth.eval.lpips import read_lpips_weights
from dreambooth.eval.prompts import class_prompt, dreambench_prompts, strip_identifier
from dreambooth.eval.report import column_headers, write_report
from dreambooth.eval.scoring import (
    METRICS,
    UNNAMED_COLUMNS,
    Embedders,
    EvalResult,
    Samples,
    Scores,
    SubjectPhotos,
    SubjectResult,
    load_paper_embedders,
    score_subject,
    summarise,
)
from dreambooth.files import read_json, write_json
from dreambooth.generate import generate_to_folder
from dreambooth.layout import RunLayout
from dreambooth.models.builtin import builtin_embedders
from dreambooth.models.loading import resolve_source, run_base_model
from dreambooth.options import EvalRequest, Sampling, ScoringModels, Thresholds  # noqa: F401  (re-exported: the eval API)

logger = logging.getLogger(__name__)

FINETUNED_LABEL = "DreamBooth"
PRETRAINED_LABEL = "Pretrained"
PROMPTS_FILE = "prompts.txt"
RECORD_FILE = "eval.json"
_IMAGE_NAME = re.compile(r"(\d+)-(\d+)\.(?:png|jpe?g|webp)", re.IGNORECASE)


def load_scorers(models: ScoringModels, device: str, model_source: str | None = None) -> Embedders:
    """Load the scorers of `model_source`'s world, or DINO, CLIP and LPIPS; fails naming what to pass."""
    own = builtin_embedders(model_source, device) if models.embedders == "auto" and model_source else None
    return (
        own if own is not None
        else load_paper_embedders(device, models.dino, models.clip, models.lpips_weights)
    )


@dataclass(frozen=True)
class ImageSource:
    """Where one row's images come from: a model to sample, or a folder of samples (or both, once sampled)."""

    model: str | ModelConfig | None = None
    """Run folder, diffusers folder, hub id or 'pocket'; or a `ModelConfig` that names a cascade's stages
    separately (a run's base model, as its run.json records it)."""
    lora: str | None = None
    """LoRA weights loaded into `model`."""
    images: Path | None = None
    """Samples in the layout of the module docstring; scored as they are."""


@dataclass(frozen=True)
class EvalPlan:
    """A checked evaluation: the photos are loaded and every source exists."""

    subject: SubjectPhotos
    identifier: str
    prompts: tuple[str, ...]
    """Prompts to sample, with the identifier; the prior prompt is added when sampling."""
    finetuned: ImageSource
    pretrained: ImageSource | None
    out: Path


def plan_eval(request: EvalRequest) -> EvalPlan:
    """Check a request before any model loads: photos, identifier, class noun, models and folders.

    Raises:
        ValueError / FileNotFoundError: naming what is missing or wrong and what to pass.
    """
    if request.model is None and request.images is None:
        raise ValueError(
            "nothing to evaluate: pass a model or run folder, or --images DIR with generated images"
        )
    run = _run_info(request.model)
    described = (
        f"{request.model!r} is not a run folder (no run.json)" if request.model else "no run folder given"
    )
    class_noun = request.class_noun or run.get("class_noun")
    if not class_noun:
        raise ValueError(f"no class noun: {described}; pass --class-noun NOUN (e.g. dog)")
    identifier = request.identifier or run.get("identifier")
    if not identifier:
        raise ValueError(f"no identifier: {described}; pass --identifier TOKEN (the [V] of the prompts)")
    photos = load_images(request.subject_dir)
    subject = SubjectPhotos(
        request.subject_dir.name, class_noun, [p.image for p in photos], [p.path.name for p in photos]
    )
    # a run folder loads every stage it trained
    finetuned = ImageSource(request.model, request.lora, images=request.images)
    pretrained = _baseline(request, finetuned, run)
    _check_source(finetuned, "model", identifier)
    _check_source(pretrained, "baseline", identifier=None)
    default_out = run_eval_dir(Path(request.model)) if run else Path("eval")
    return EvalPlan(
        subject, identifier,
        tuple(dreambench_prompts(identifier, class_noun, request.live)[: request.max_prompts]), finetuned,
        pretrained, request.out or default_out,
    )


def run_eval_dir(run: Path) -> Path:
    """Where the evaluation of a run folder goes by default."""
    return run / "eval"


def _run_info(model: str | None) -> dict:
    path = RunLayout(Path(model)).run_info if model else None
    return read_json(path) if path is not None and path.is_file() else {}


def _baseline(request: EvalRequest, finetuned: ImageSource, run: dict) -> ImageSource | None:
    """The pretrained row's source: images, a named model, the LoRA's base, the run's base (every stage), or
    none."""
    if not request.use_baseline:
        if request.baseline or request.baseline_images:
            raise ValueError("--no-baseline contradicts --baseline/--baseline-images: pick one")
        return None
    if request.baseline_images:
        return ImageSource(images=request.baseline_images)
    if request.baseline or finetuned.lora:
        return ImageSource(request.baseline or finetuned.model)
    if "model" not in run:
        logger.info(
            "no pretrained baseline (pass --baseline MODEL): no Pretrained row, no context/entanglement flags"
        )
        return None
    return ImageSource(run_base_model(run["model"]))


def _check_source(source: ImageSource | None, what: str, identifier: str | None) -> None:
    if source is None:
        return
    if source.images is not None:
        index = _index_folder(source.images)
        for path in (path for _, paths in index for path in paths):
            try:
                open_image(path)  # decoded now, so that a damaged file is named before any scorer loads
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"{what} image {str(path)!r} cannot be read ({error}): regenerate it, or delete the "
                    "folder's images and prompts.txt to sample them again"
                ) from error
        prompts = [prompt for prompt, _ in index]
        # Stripping the identifier changes no prompt: it is not in them.
        if identifier and all(strip_identifier(p, identifier) == " ".join(p.split()) for p in prompts):
            raise ValueError(
                f"identifier {identifier!r} is in none of the prompts of "
                f"{str(source.images / PROMPTS_FILE)!r}; "
                "pass --identifier with the token the images were generated with"
            )
        return
    try:
        resolve_source(
            source.model if isinstance(source.model, ModelConfig) else ModelConfig(source=source.model)
        )
    except (ValueError, FileNotFoundError) as error:
        hint = " (pass --baseline MODEL or --no-baseline)" if what == "baseline" else ""
        raise type(error)(f"{what}: {error}{hint}") from error
    if source.lora is not None and not Path(source.lora).exists():
        raise FileNotFoundError(f"LoRA weights {source.lora!r} do not exist")


def _index_folder(folder: Path) -> list[tuple[str, list[Path]]]:
    """(prompt, its image files in order of k) for every line of a samples folder's prompts.txt.

    Raises:
        FileNotFoundError: if the folder or its prompts.txt is missing.
        ValueError: if a prompt has no image, or an image belongs to no prompt.
    """
    layout = f"expected the layout `dreambooth generate` writes: {PROMPTS_FILE} + <prompt index>-<k>.png"
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {str(folder)!r} does not exist")
    if not (folder / PROMPTS_FILE).is_file():
        raise FileNotFoundError(f"images folder {str(folder)!r} has no {PROMPTS_FILE}; {layout}")
    prompts = (folder / PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    if not prompts:
        raise ValueError(f"{str(folder / PROMPTS_FILE)!r} is empty; {layout}")
    files: dict[int, list[tuple[int, Path]]] = {}
    for path in folder.iterdir():
        if match := _IMAGE_NAME.fullmatch(path.name):
            files.setdefault(int(match[1]), []).append((int(match[2]), path))
    stray = sorted(set(files) - set(range(len(prompts))))
    if stray:
        raise ValueError(
            f"images folder {str(folder)!r} has images of prompt {stray[0]} but {len(prompts)} prompts; "
            f"{layout}"
        )
    empty = [i for i in range(len(prompts)) if i not in files]
    if empty:
        raise ValueError(
            f"images folder {str(folder)!r}: prompt {empty[0]} ({prompts[empty[0]]!r}) has no images; "
            f"{layout}"
        )
    return [(prompt, [path for _, path in sorted(files[i])]) for i, prompt in enumerate(prompts)]


def read_samples(folder: Path, label: str, class_noun: str, identifier: str | None = None) -> Samples:
    """Load a samples folder (module docstring) as one row's images.

    Args:
        folder: The folder.
        label: The row's label.
        class_noun: Its prompt "a [class noun]" gives the prior samples.
        identifier: The identifier in the prompts; None for a pretrained model.

    Raises:
        FileNotFoundError / ValueError: if the folder is not in the layout.
    """
    by_prompt: dict[str, list] = {}
    for prompt, paths in _index_folder(folder):
        by_prompt.setdefault(prompt, []).extend(open_image(path) for path in paths)
    class_samples = by_prompt.pop(class_prompt(class_noun), [])
    return Samples(label, by_prompt, identifier, class_samples)


def samples_dir(out: Path, row: str) -> Path:
    """Where an evaluation in `out` keeps the images of `row` ('finetuned' or 'pretrained')."""
    return out / "samples" / row


def sample(plan: EvalPlan, sampling: Sampling) -> EvalPlan:
    """Sample every source of `plan` that has no images yet; return the plan pointing at its images."""
    prior = class_prompt(plan.subject.class_noun)
    finetuned = _sample(plan.finetuned, [*plan.prompts, prior], samples_dir(plan.out, "finetuned"), sampling)
    pretrained = None
    if plan.pretrained is not None:
        plain = [strip_identifier(p, plan.identifier) for p in plan.prompts]
        pretrained = _sample(plan.pretrained, [*plain, prior], samples_dir(plan.out, "pretrained"), sampling)
    return replace(plan, finetuned=finetuned, pretrained=pretrained)


def _sample(source: ImageSource, prompts: list[str], out: Path, sampling: Sampling) -> ImageSource:
    if source.images is not None:
        return source
    # images left by another setting (more per prompt) must not be scored
    shutil.rmtree(out, ignore_errors=True)
    generate_to_folder(
        source.model, prompts, out, lora=source.lora,
        sampling=replace(sampling, device=sampling.resolved_device()),
    )
    return replace(source, images=out)


def score(
    plan: EvalPlan, embedders: Embedders, cache: EmbeddingCache | None = None,
    thresholds: Thresholds = Thresholds(),
) -> SubjectResult:
    """Score the images of a sampled plan (see :func:`sample`); `thresholds` decide the failure-mode flags.

    Raises:
        ValueError: if a source has no images yet.
    """
    if plan.finetuned.images is None or (plan.pretrained is not None and plan.pretrained.images is None):
        raise ValueError("the plan has sources without images: call sample(plan, sampling) first")
    class_noun = plan.subject.class_noun
    finetuned = read_samples(plan.finetuned.images, FINETUNED_LABEL, class_noun, plan.identifier)
    pretrained = (
        read_samples(plan.pretrained.images, PRETRAINED_LABEL, class_noun) if plan.pretrained else None
    )
    return score_subject(
        plan.subject, [finetuned], embedders, pretrained=pretrained, thresholds=thresholds, cache=cache
    )


def evaluate(
    plan: EvalPlan, embedders: Embedders, sampling: Sampling, cache: EmbeddingCache | None = None,
    thresholds: Thresholds = Thresholds(),
) -> EvalResult:
    """Sample, score and write the report, metrics.json and eval.json into ``plan.out``.

    Args:
        plan: From :func:`plan_eval`.
        embedders: The models behind the table's columns.
        sampling: How missing images are sampled.
        cache: Keeps photo and pretrained-image embeddings across subjects (DreamBench).
        thresholds: When a prompt is flagged with a failure mode.

    Returns:
        The table of this one subject.
    """
    # until it is rewritten, the folder holds no finished evaluation
    (plan.out / RECORD_FILE).unlink(missing_ok=True)
    plan = sample(plan, sampling)
    result = summarise([score(plan, embedders, cache, thresholds)], embedders, thresholds)
    write_report(result, plan.out)
    write_json(plan.out / RECORD_FILE, _record(plan, sampling))
    return result


def _record(plan: EvalPlan, sampling: Sampling) -> dict:
    def source(s: ImageSource | None) -> dict | None:
        if s is None:
            return None
        stages = {"model": s.model} if not isinstance(s.model, ModelConfig) else {
            "model": s.model.source, "sr_model": s.model.sr_source, "upscaler_model": s.model.upscaler_source}
        return {
            k: v if v is None else str(v) for k, v in {**stages, "lora": s.lora, "images": s.images}.items()
        }

    return {
        "subject": plan.subject.name, "class_noun": plan.subject.class_noun, "identifier": plan.identifier,
        "finetuned": source(plan.finetuned), "pretrained": source(plan.pretrained),
        "sampling": dataclasses.asdict(sampling),
    }  # fmt: skip


def run_eval(
    request: EvalRequest, sampling: Sampling = Sampling(), models: ScoringModels = ScoringModels(),
    thresholds: Thresholds = Thresholds(),
) -> tuple[EvalResult, Path]:
    """``dreambooth eval``: check the request, load the scorers, then sample and score.

    Returns:
        The result and the path of report.html.

    Raises:
        ValueError / FileNotFoundError: for a problem with the inputs, before any diffusion model loads.
    """
    plan = plan_eval(request)
    if models.lpips_weights is not None:
        # a wrong file is named now, not after the other scorers loaded
        read_lpips_weights(models.lpips_weights)
    base = plan.pretrained.model if plan.pretrained is not None else plan.finetuned.model
    base = base.source if isinstance(base, ModelConfig) else base
    embedders = load_scorers(models, sampling.resolved_device(), model_source=base)
    return evaluate(plan, embedders, sampling, thresholds=thresholds), plan.out / "report.html"


def table_text(rows: Sequence[Scores], columns: dict[str, str] | None = None) -> str:
    """The table's rows as aligned text for a terminal, one metric per line of the header.

    Args:
        rows: :class:`~dreambooth.eval.scoring.Scores`, e.g. ``EvalResult.rows``.
        columns: Column names by metric, saying which scorer produced each (``EvalResult.columns``);
            None: names that say the scorer is not known.
    """
    headers = column_headers(columns if columns is not None else UNNAMED_COLUMNS)
    letters = {key: chr(ord("A") + i) for i, key in enumerate(METRICS)}
    width = max(len(row.label) for row in rows) + 2

    def cell(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.3f}':>8}"

    legend = [f"{letters[key]}: {headers[key]}" for key in METRICS]
    head = " " * width + "".join(f"{letters[key]:>8}" for key in METRICS)
    body = [row.label.ljust(width) + "".join(cell(getattr(row, key)) for key in METRICS) for row in rows]
    return "\n".join([*legend, head, *body])
