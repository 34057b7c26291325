"""Sampling text-to-image models, single-stage or cascaded, with per-image seeds.

Image i of a request is fully determined by its seed (one `torch.Generator` per image), so a
set can be regenerated in part, batched differently, or compared across checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionUpscalePipeline,
)
from PIL import Image
from tqdm.auto import tqdm

from dreambooth.config import ModelConfig
from dreambooth.files import read_json, safetensors_keys
from dreambooth.models.sd_upscaler import NOISE_LEVEL as UPSCALER_NOISE_LEVEL
from dreambooth.options import Sampling

logger = logging.getLogger(__name__)

SAMPLERS = {  # the names of config.Sampler
    "dpm++": DPMSolverMultistepScheduler,
    "ddpm": DDPMScheduler,  # the ancestral sampler of the paper
    "ddim": DDIMScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


@contextlib.contextmanager
def using_sampler(pipelines: Sequence, name: str):
    """Swap each pipeline's scheduler for `name` (same noise schedule and parameterisation), then restore it.

    Flow-matching pipelines (SD3, FLUX) keep their own sampler: the DDPM solvers do not apply to them.

    Restoring matters: a pipeline saved after sampling must keep the scheduler it came with.
    """
    originals = [p.scheduler for p in pipelines]
    try:
        for pipeline in pipelines:
            if is_flow_matching(pipeline.scheduler):  # the DDPM samplers above do not apply to a flow model
                continue
            scheduler = SAMPLERS[name].from_config(pipeline.scheduler.config)
            if "variance_type" not in inspect.signature(SAMPLERS[name]).parameters:
                # DDIM and Euler a cannot use a learned variance; IF's pipelines read this key to drop its
                # channels.
                scheduler.register_to_config(variance_type="fixed_small")
            pipeline.scheduler = scheduler
        yield
    finally:
        for pipeline, original in zip(pipelines, originals):
            pipeline.scheduler = original


SAMPLE_PIXELS = 4 * 512 * 512
"""Pixels sampled per batch during training: the decode of a batch must fit beside the model being trained."""


def sampling_batch(resolution: int, limit: int = 8) -> int:
    """Images per batch when sampling at `resolution` during training: 4 at 512 px, 1 at 1024 px, at most
    `limit`."""
    return max(1, min(limit, SAMPLE_PIXELS // resolution**2))


def is_flow_matching(scheduler) -> bool:
    """Whether a pipeline samples a flow-matching model (SD3, FLUX): it keeps its own Euler sampler."""
    return type(scheduler).__name__.startswith("FlowMatch")


@torch.no_grad()
def generate(
    pipelines: Sequence, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25,
    guidance: Sequence[float], sampler: str = "dpm++", batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None, progress: str | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair through every stage of `pipelines`.

    Args:
        pipelines: the stock diffusers pipelines of a model, base first (IF: then super-resolution).
        guidance: classifier-free guidance per pipeline.
        autocast_dtype: run under autocast (needed when weights are in mixed dtypes during training).
        progress: description of a progress bar over batches, or None for none.
    """
    return generate_cascades(
        {"": pipelines}, prompts, seeds, steps=steps, guidance=guidance, sampler=sampler,
        batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress,
    )[""]


@torch.no_grad()
def generate_cascades(
    cascades: Mapping[str, Sequence], prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25,
    guidance: Sequence[float], sampler: str = "dpm++", batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None, progress: str | None = None,
) -> dict[str, list[Image.Image]]:
    """`generate` for several cascades that may share their first stages (the same pipeline objects).

    A shared stage is sampled once and its output handed to every cascade that continues from it,
    e.g. a fine-tuned base followed by the pretrained or the fine-tuned super-resolution stage.
    Each cascade's images equal what `generate` gives it alone.
    """
    assert len(prompts) == len(seeds)
    every = {id(p): p for pipelines in cascades.values() for p in pipelines}.values()
    for pipeline in every:
        pipeline.set_progress_bar_config(disable=True)
    device = next(iter(cascades.values()))[0].device
    images: dict[str, list[Image.Image]] = {name: [] for name in cascades}
    starts = range(0, len(prompts), batch_size)
    with using_sampler(list(every), sampler), _autocast(device, autocast_dtype):
        for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch"):
            batch_prompts, batch_seeds = (
                list(prompts[start : start + batch_size]), seeds[start : start + batch_size],
            )
            done: dict[tuple, object] = {}  # (ids of the stages so far, final?) -> their output
            for name, pipelines in cascades.items():
                image = None
                for index, (pipeline, scale) in enumerate(zip(pipelines, guidance)):
                    last = index == len(pipelines) - 1
                    key = (tuple(id(p) for p in pipelines[: index + 1]), last)
                    if key not in done:
                        done[key] = _sample_stage(
                            pipeline, index, batch_prompts, batch_seeds, steps, scale, image, last
                        )
                    image = done[key]
                images[name] += image
    return images


@torch.no_grad()
def super_resolve(
    sr, lowres: torch.Tensor, prompts: Sequence[str], *, steps: int = 20, guidance: float = 4.0,
    seed: int = 0, batch_size: int = 32,
) -> torch.Tensor:
    """Super-resolve low-res images [n, 3, h, w] in [-1, 1] with an IF super-resolution
    pipeline, each with its prompt; image k uses seed + k. Returns [n, 3, H, W] in [-1, 1]."""
    sr.set_progress_bar_config(disable=True)
    outputs = []
    for i in range(0, len(prompts), batch_size):
        generators = [
            torch.Generator().manual_seed(seed + k) for k in range(i, min(i + batch_size, len(prompts)))
        ]
        out = sr(
            image=lowres[i : i + batch_size].to(sr.device), prompt=list(prompts[i : i + batch_size]),
            num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt",
            clean_caption=False,
        ).images
        outputs.append(out.clamp(-1, 1).cpu())
    return torch.cat(outputs)


def _sample_stage(pipeline, index: int, prompts, seeds, steps: int, scale: float, image, last: bool):
    """Stage `index` of a cascade: PIL images if it is the last stage, else the pipeline's tensors."""
    generators = [torch.Generator().manual_seed(int(s) + 1_000_003 * index) for s in seeds]
    extra = {} if image is None else {"image": image}
    # a cascade's x4 stage: [0, 1] images, IF's noise level
    if isinstance(pipeline, StableDiffusionUpscalePipeline):
        extra = {"image": (image / 2 + 0.5).clamp(0, 1), "noise_level": UPSCALER_NOISE_LEVEL}
    if "clean_caption" in inspect.signature(pipeline.__call__).parameters:
        extra["clean_caption"] = False  # IF's caption cleaning needs bs4 + ftfy, and changes nothing here
    return pipeline(
        prompt=prompts, num_inference_steps=steps, guidance_scale=scale, generator=generators,
        output_type="pil" if last else "pt", **extra,
    ).images


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class LoadedModel:
    """A model ready to sample: its pipelines (base first), their default guidance, its subject."""

    pipelines: list
    guidance: list[float]
    subject: dict
    """A run's identifier and class noun (its run.json); empty for other sources."""


def load_model(
    model: str | ModelConfig, *, lora: str | None = None, device: str | None = None
) -> LoadedModel:
    """Load a run folder, diffusers/cascade folder, hub id or 'pocket' (or a `ModelConfig` naming a
    cascade's stages separately) for sampling.

    A run folder loads every stage it was trained with: its merged pipeline, or (a LoRA run saved
    without one) the model it started from plus its `lora/`. A stage that gets a LoRA samples with
    fixed variance (see `models.ddpm`).
    """
    from dreambooth.config import RunConfig, TrainConfig
    from dreambooth.layout import CASCADE_STAGE_DIRS, RunLayout
    from dreambooth.models.ddpm import without_learned_variance
    from dreambooth.models.loading import load_stages, resolve_source
    from dreambooth.models.lora import load_lora_weights

    config = model if isinstance(model, ModelConfig) else ModelConfig(source=model)
    layout = RunLayout(Path(config.source))
    subject = read_json(layout.run_info) if layout.run_info.is_file() else {}
    if subject and lora is None and not layout.pipeline.is_dir() and (layout.root / "lora").is_dir():
        lora = str(layout.root / "lora")
    # A LoRA may adapt each stage's text encoder: load every stage's own, as a run that trains them does.
    stages = load_stages(
        resolve_source(config),
        RunConfig(model=config, train=TrainConfig(train_text_encoder=lora is not None)),
    )
    pipelines = [stage.pipeline for stage in stages]
    if lora is not None:
        lora_path = Path(lora)
        if not lora_path.exists():
            raise FileNotFoundError(f"LoRA weights {lora!r} do not exist")
        for pipeline, stage_dir in zip(pipelines, CASCADE_STAGE_DIRS.values()):
            path = lora_path / stage_dir if (lora_path / stage_dir).exists() else lora_path
            if path.exists() and (len(pipelines) == 1 or path != lora_path):
                load_lora_weights(pipeline, path)
                pipeline.scheduler = without_learned_variance(pipeline.scheduler)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedModel([p.to(device) for p in pipelines], [s.default_guidance for s in stages], subject)


def read_prompts(prompts: Sequence[str], prompts_file: Path | None) -> list[str]:
    """Prompts from flags and a file (one per line; blank lines and # comments skipped).

    Raises:
        ValueError: if there are none.
    """
    out = list(prompts)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise FileNotFoundError(f"prompts file {str(prompts_file)!r} does not exist")
        try:
            lines = prompts_file.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(
                f"prompts file {str(prompts_file)!r} is not a text file (not UTF-8 at byte {error.start})"
            ) from error
        out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def generate_to_folder(
    model: str | ModelConfig, prompts: list[str], out: Path, *, lora: str | None = None,
    sampling: Sampling = Sampling(),
) -> Path:
    """Sample `sampling.num_images` per prompt; write `<prompt index>-<k>.png`, `grid.png` and
    `prompts.txt`."""
    from dreambooth.grid import image_grid, upscale_for_viewing

    num_images, seed, guidance = sampling.num_images, sampling.seed, sampling.guidance
    check_generate(model, prompts, out, lora=lora)
    loaded = load_model(model, lora=lora, device=sampling.device)
    if "identifier" in loaded.subject:
        name = loaded.subject["identifier"]
        prompts = [p.replace("[V]", name).replace("{identifier}", name) for p in prompts]
    scales = [guidance] * len(loaded.pipelines) if guidance is not None else loaded.guidance
    images = generate(
        loaded.pipelines, *expand_prompts(prompts, num_images, seed), steps=sampling.steps, guidance=scales,
        sampler=sampling.sampler, progress="generate",
    )
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"{i // num_images:03d}-{i % num_images}.png")
    rows = [
        [upscale_for_viewing(im) for im in images[i * num_images : (i + 1) * num_images]]
        for i in range(len(prompts))
    ]
    image_grid(rows, prompts).save(out / "grid.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return out


IDENTIFIER_PLACEHOLDERS = ("[V]", "{identifier}")


def check_generate(
    model: str | ModelConfig, prompts: Sequence[str], out: Path, *, lora: str | None = None
) -> None:
    """Check a sampling request before any weights load: the model, the LoRA file, the prompts, the output
    folder.

    Raises:
        ValueError / FileNotFoundError: naming the flag or file and what to pass instead.
    """
    from dreambooth.layout import RunLayout
    from dreambooth.models.loading import resolve_source

    config = model if isinstance(model, ModelConfig) else ModelConfig(source=model)
    resolve_source(config)
    if lora is not None:
        check_lora_file(Path(lora))
    run_info = RunLayout(Path(config.source)).run_info
    try:
        subject = read_json(run_info) if run_info.is_file() else {}
    except ValueError as error:
        raise ValueError(
            f"{str(run_info)!r} is damaged ({error}); pass the run's pipeline/ folder as --model and "
            "write the identifier in the prompts"
        ) from error
    if subject.get("identifier") and not any(_names_subject(text, subject["identifier"]) for text in prompts):
        logger.warning(
            "no prompt names the subject: write [V] where it goes (e.g. 'a [V] %s on a beach'; this run's "
            "[V] is %r), else the images show the class as the fine-tuned model draws it",
            subject.get("class_noun", "dog"), subject["identifier"],
        )
    if not run_info.is_file() and any(p in text for text in prompts for p in IDENTIFIER_PLACEHOLDERS):
        raise ValueError(
            f"a prompt holds [V], but {config.source!r} is not a run folder, so there is no identifier to "
            "put there: write the identifier itself (a run's run.json names it), or pass the run "
            "folder as --model"
        )
    check_output_folder(out, "--out")


def _names_subject(prompt: str, identifier: str) -> bool:
    return any(p in prompt for p in IDENTIFIER_PLACEHOLDERS) or bool(
        re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", prompt)
    )


def check_lora_file(path: Path) -> None:
    """A LoRA folder (holding the file diffusers writes) or .safetensors file that exists and whose header
    reads."""

    from dreambooth.layout import CASCADE_STAGE_DIRS
    from dreambooth.models.lora import LORA_FILE

    if not path.exists():
        raise FileNotFoundError(f"--lora {str(path)!r} does not exist")
    candidates = (path / LORA_FILE, *(path / stage / LORA_FILE for stage in CASCADE_STAGE_DIRS.values()))
    files = [path] if path.is_file() else [p for p in candidates if p.is_file()]
    if not files:
        raise FileNotFoundError(
            f"--lora {str(path)!r} holds no {LORA_FILE} (pass a LoRA run's lora/ folder or the file itself)"
        )
    for file in files:
        keys = safetensors_keys(file, "--lora:")
        if not any("lora" in key for key in keys):
            raise ValueError(
                f"--lora: {str(file)!r} holds no LoRA weights (no 'lora' keys): is it a full model?"
            )


def check_output_folder(out: Path, flag: str) -> None:
    """`out` is a folder that can be written, or can be created (nothing is created here)."""
    import os

    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} is a file, not a folder: pass a folder for the images")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {str(out)!r} cannot be written ({str(existing)!r} is not a writable folder): choose "
            f"another {flag}"
        )


def expand_prompts(prompts: Sequence[str], num_images: int, seed: int) -> tuple[list[str], list[int]]:
    """Each prompt `num_images` times, in order, with image k of every prompt seeded `seed + k`.

    The same seeds for every prompt make before/after pairs (pretrained and fine-tuned) start
    from the same noise. Returns (prompts, seeds), one entry per image, for :func:`generate`.
    """
    return [p for p in prompts for _ in range(num_images)], [
        seed + k for _ in prompts for k in range(num_images)
    ]
