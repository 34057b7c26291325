"""The DreamBooth recipe: photos -> identifier -> class images -> fine-tuned stages -> exports.

Every input is checked before any weights load; then each stage of the model (one for Stable
Diffusion, base and super-resolution for a cascade) is fine-tuned by the same loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from dreambooth.config import RunConfig, validate
from dreambooth.data.images import LoadedImage, load_images, warn_small_images
from dreambooth.data.training_set import TrainingSet, encode_captions, encode_examples
from dreambooth.eval.prompts import format_prompt
from dreambooth.export.pipeline import export_run
from dreambooth.files import read_json, write_json
from dreambooth.generate import expand_prompts, generate, is_flow_matching, sampling_batch
from dreambooth.grid import image_grid, upscale_for_viewing
from dreambooth.identifier import check_identifier, choose_identifier
from dreambooth.layout import RunLayout
from dreambooth.models.builtin import unknown_class_noun
from dreambooth.models.ddpm import without_learned_variance
from dreambooth.models.loading import (
    FAMILIES,
    cascade_problems,
    load_stages,
    option_problems,
    resolve_source,
    trained_text_encoders,
)
from dreambooth.models.spec import Family, ModelSource, Stage
from dreambooth.prior import (
    ClassImageSpec,
    class_image_paths,
    generate_class_images,
    model_fingerprint,
    record_class_images,
)
from dreambooth.run_folder import open_run_folder, record_config, removed_if_left_empty
from dreambooth.training.loop import DTYPES, StagePlan, train_stage

if TYPE_CHECKING:
    from dreambooth.eval.during_training import BestCheckpointPolicy, TrainingEvaluator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubjectName:
    """What prompts call the subject: its identifier [V] and its class noun."""

    identifier: str
    class_noun: str

    def fill(self, template: str) -> str:
        return format_prompt(template, self.identifier, self.class_noun)


def finetune(cfg: RunConfig) -> RunLayout:
    """Run DreamBooth as configured; return the run folder's layout. A run folder this call creates is
    removed again if the call fails before writing anything in it.

    Raises:
        ValueError / FileNotFoundError: for any problem with the inputs, before loading weights.
    """
    with removed_if_left_empty(cfg.run_dir):
        return _finetune(cfg)


def _finetune(cfg: RunConfig) -> RunLayout:
    validate(cfg)
    photos = load_images(cfg.subject.instance_dir, on_bad_file=cfg.subject.on_bad_file)
    source = resolve_source(cfg.model)
    family = FAMILIES[source.family]
    if problems := option_problems(cfg, family) + cascade_problems(cfg, source):
        raise ValueError(
            f"options that do not fit {cfg.model.source!r} (a {family.name} model):\n  - "
            + "\n  - ".join(problems)
        )
    accelerator = _make_accelerator(cfg)
    evaluating = cfg.eval.eval_every > 0 and accelerator.is_main_process
    embedders = None
    if evaluating:  # the evaluation's modules (and their models) load only in runs that evaluate
        from dreambooth.eval.during_training import load_eval_embedders

        embedders = load_eval_embedders(cfg.eval, cfg.model.source, str(accelerator.device))
    layout, resuming = (
        open_run_folder(cfg) if accelerator.is_main_process else (RunLayout(cfg.run_dir), cfg.output.resume)
    )
    accelerator.wait_for_everyone()

    stages = load_stages(source, cfg)
    trained = [s for s in stages if not family.cascade or s.name in cfg.cascade.stages]
    subject = _resolve_subject(cfg, stages, family, layout, resuming)
    info = _run_info(cfg, source, subject, trained, status="training")

    @functools.cache
    def record_start() -> None:
        """Record the config and run.json (once), when the first stage's checkpoint (if any) has loaded:
        a command that fails before (a bad input, a damaged or foreign checkpoint) records no run."""
        if accelerator.is_main_process:
            record_config(layout, cfg, subject.identifier)
            write_json(layout.run_info, info)
        if accelerator.log_with:
            accelerator.init_trackers("dreambooth")
    # The stages wait on the CPU: sampling class images brings the cascade onto the device, training one stage
    # at a time.
    class_images = None
    if cfg.prior.enabled:  # made before any stage trains, so that every stage's prior is the frozen model's
        cascade = stages[: stages.index(trained[-1]) + 1]
        with stages_on(cascade, accelerator.device):
            class_images = _class_images(cfg, cascade, subject, family, layout, accelerator)
    for stage in trained:
        warn_small_images(photos, stage.resolution)
        # train_stage sends the parts the step never runs back to the CPU
        with stages_on([stage], accelerator.device):
            data = _training_set(cfg, stage, photos, subject, class_images, family)
            evaluator = (
                _evaluator(cfg, stages, stage, subject, photos, embedders, accelerator.device) if evaluating
                else None
            )
            # its variance channels do not train
            stage.pipeline.scheduler = without_learned_variance(stage.pipeline.scheduler)
            validator = _validator(cfg, stages, stage, subject, layout, accelerator, evaluator)
            train_stage(
                stage, data, _plan(cfg, stage, family), layout.stage(stage.name), accelerator, validator,
                on_start=record_start,
            )
        accelerator.free_memory()

    if accelerator.is_main_process:
        written = export_run(
            stages, layout, family, save_pipeline=cfg.output.save_pipeline,
            save_single_file=cfg.output.save_single_file, run_info=info,
        )
        write_json(layout.run_info, _run_info(cfg, source, subject, trained, status="done", outputs=written))
    accelerator.end_training()
    return layout


def _make_accelerator(cfg: RunConfig) -> Accelerator:
    use_tb = cfg.output.logger == "tensorboard" or (
        cfg.output.logger == "auto" and importlib.util.find_spec("tensorboard")
    )
    # accelerate keeps process-wide state; a previous run in this process (a test, a DreamBench
    # loop over subjects) must not impose its precision or accumulation on this one.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # so that torchrun / accelerate launch start gloo processes on CPU
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="tensorboard" if use_tb else None, project_dir=str(RunLayout(cfg.run_dir).tensorboard),
    )


def _resolve_subject(
    cfg: RunConfig, stages: list[Stage], family: Family, layout: RunLayout, resuming: bool
) -> SubjectName:
    """The identifier: the resumed run's, the user's (checked), or chosen from the model's rare tokens."""
    class_noun = cfg.subject.class_noun
    if (problem := unknown_class_noun(cfg.model.source, class_noun)) is not None:
        logger.warning(problem)
    if resuming and layout.run_info.is_file():
        recorded = read_json(layout.run_info)["identifier"]
        if cfg.identifier.identifier not in (None, recorded):
            logger.warning(
                "resume: keeping the run's identifier %r, not %r", recorded, cfg.identifier.identifier
            )
        return SubjectName(recorded, class_noun)
    if cfg.identifier.identifier is not None:
        text = cfg.identifier.identifier
        if (seen := family.preprocess_prompt(text)) != text:
            logger.warning(
                "identifier: %s models read prompts as %r; %r is trained and sampled as %r", family.name,
                seen, text, seen,
            )
        for stage in stages:
            for message in check_identifier(
                list(stage.tokenizers), family.preprocess_prompt(text), class_noun
            ):
                logger.warning("identifier: %s", message)
    else:
        text = choose_identifier(
            list(stages[0].tokenizers), class_noun, num_tokens=cfg.identifier.num_tokens,
            seed=cfg.identifier.seed,
        ).text
    logger.info(
        "identifier [V] = %r: prompts read %r", text,
        cfg.subject.instance_prompt.format(identifier=text, class_noun=class_noun),
    )
    print(
        f"identifier [V] = {text!r}  (prompt: "
        f"{cfg.subject.instance_prompt.format(identifier=text, class_noun=class_noun)!r})"
    )
    return SubjectName(text, class_noun)


def _class_images(
    cfg: RunConfig, cascade: list[Stage], subject: SubjectName, family: Family, layout: RunLayout,
    accelerator: Accelerator,
) -> list[Image.Image]:
    """Generate (once) and load the frozen model's class images, sampled through every stage of `cascade`.

    One set serves every trained stage, each seeing it at its own resolution: the base stage the
    paper's prior, a super-resolution stage the frozen cascade's own outputs (without them, an SR
    stage fine-tuned on the subject alone redraws every "a [class]" as the subject). Every process
    makes its share of the missing images (image i has seed `seed + i` whichever makes it); the
    main process then writes the manifest.
    """
    pipelines = [s.pipeline for s in cascade]
    prompt = subject.fill(cfg.subject.class_prompt)
    spec = ClassImageSpec(
        model=model_fingerprint(*pipelines), prompt=prompt, prompt_tokenized=family.preprocess_prompt(prompt),
        resolution=cascade[-1].resolution, sampler=_class_sampler(cfg, cascade), steps=cfg.prior.steps,
        guidance=(
            cfg.prior.guidance_scale or cascade[0].default_guidance,
            *(s.default_guidance for s in cascade[1:]),
        ),
        seed=cfg.prior.seed,
        # A GPU run samples under its mixed precision; on a CPU bf16 is slower than fp32.
        precision=cfg.train.mixed_precision
        if accelerator.device.type == "cuda" and cfg.train.mixed_precision != "no" else "fp32",
    )
    root = cfg.prior.class_dir or layout.class_images
    class_dir = root if len(cascade) == 1 else root / cascade[-1].name
    count = cfg.prior.num_class_images
    generate_class_images(
        pipelines, class_dir, spec, count, batch_size=cfg.prior.batch_size,
        rank=accelerator.process_index, num_ranks=accelerator.num_processes,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record_class_images(class_dir, spec, count)
    accelerator.wait_for_everyone()
    return [Image.open(p).convert("RGB") for p in class_image_paths(class_dir, spec, count)]


def _class_sampler(cfg: RunConfig, cascade: list[Stage]) -> str:
    """The sampler class images are made with, as the manifest records it: a flow-matching model keeps its
    own."""
    scheduler = cascade[0].pipeline.scheduler
    return type(scheduler).__name__ if is_flow_matching(scheduler) else cfg.prior.sampler


def _training_set(
    cfg: RunConfig, stage: Stage, photos: list[LoadedImage], subject: SubjectName,
    class_images: list[Image.Image] | None, family: Family,
) -> TrainingSet:
    captions = [
        subject.fill(p.caption if (p.caption and cfg.subject.use_captions) else cfg.subject.instance_prompt)
        for p in photos
    ]
    instance = encode_examples(stage, [p.image for p in photos], captions, flip=cfg.subject.random_flip)
    classes = None
    if class_images is not None:
        classes = encode_examples(
            stage, class_images, [subject.fill(cfg.subject.class_prompt)] * len(class_images)
        )
    text_cache = None
    if not trained_text_encoders(cfg, family) and cfg.train.cache_latents:
        text_cache = encode_captions(stage, instance.captions + (classes.captions if classes else []))
    return TrainingSet(instance, classes, text_cache)


def _max_steps(cfg: RunConfig, stage: Stage) -> int:
    """Optimizer steps of `stage`: a cascade's super-resolution stages (sr, upscaler) may have their own."""
    return cfg.train.max_steps if stage.name == "base" else cfg.cascade.sr_max_steps or cfg.train.max_steps


def _plan(cfg: RunConfig, stage: Stage, family: Family) -> StagePlan:
    sr = stage.name != "base"
    lr = (cfg.cascade.sr_learning_rate or cfg.learning_rate) if sr else cfg.learning_rate
    train = dataclasses.replace(cfg.train, max_steps=_max_steps(cfg, stage))
    text_lr = cfg.optim.text_encoder_learning_rate or lr
    rates = {"text_encoder_2": cfg.optim.text_encoder_2_learning_rate or text_lr}
    return StagePlan(
        train=train, optim=cfg.optim, lora=cfg.lora, checkpoint=cfg.checkpoint, learning_rate=lr,
        text_encoder_learning_rates={
            name: rates.get(name, text_lr) for name in trained_text_encoders(cfg, family)
        },
        prior_weight=cfg.prior.loss_weight,
        validate_every=(cfg.validation.every_n_steps, cfg.eval.eval_every),
        keep_best=_best_checkpoint_policy(cfg) if cfg.eval.eval_every else None,
    )


def _best_checkpoint_policy(cfg: RunConfig) -> BestCheckpointPolicy:
    from dreambooth.eval.during_training import BestCheckpointPolicy

    return BestCheckpointPolicy(cfg.eval.best_metric, cfg.eval.max_pres_increase)


def _validator(
    cfg: RunConfig, stages: list[Stage], stage: Stage, subject: SubjectName, layout: RunLayout,
    accelerator: Accelerator, evaluator,
):
    """Validation of `stage`: a grid of the validation prompts through the cascade up to it, and the
    paper's metrics when evaluation is on. Runs on the main process only."""
    v = cfg.validation
    max_steps = _max_steps(cfg, stage)
    prompts = [subject.fill(p) for p in v.validation_prompts]
    cascade = stages[: stages.index(stage) + 1]
    pipelines = [s.pipeline for s in cascade]

    def validate(step: int) -> dict[str, float] | None:
        if not accelerator.is_main_process:
            return None
        done = step == max_steps
        modes = {m: m.training for m in (stage.denoiser, *stage.text_encoders.values())}
        for module in modes:
            module.eval()  # no dropout in what is sampled and scored (a trained text encoder has some)
        if v.num_images and (done or (v.every_n_steps and step % v.every_n_steps == 0)):
            with stages_on(cascade, accelerator.device):
                images = generate(
                    pipelines, *expand_prompts(prompts, v.num_images, v.seed), steps=v.steps,
                    guidance=[v.guidance_scale or s.default_guidance for s in stages],
                    autocast_dtype=DTYPES[cfg.train.mixed_precision],
                    batch_size=sampling_batch(stages[-1].resolution),
                )
            rows = [
                [upscale_for_viewing(im) for im in images[i * v.num_images : (i + 1) * v.num_images]]
                for i in range(len(prompts))
            ]
            out = layout.samples(stage.name) / f"step-{step:06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            image_grid(rows, prompts).save(out)
        if evaluator is not None and (done or step % cfg.eval.eval_every == 0):
            with stages_on(cascade, accelerator.device):
                scores = evaluator(step)
        else:
            scores = None
        for module, training in modes.items():
            module.train(training)
        return scores

    return validate


@contextlib.contextmanager
def stages_on(stages: list[Stage], device):
    """Bring the stages' pipelines onto `device` (stages waiting on the CPU, parts that training left off
    the device: VAE, cached text encoders), then return each module where it was.

    A quantised denoiser stays on the device: bitsandbytes quantises it on its first move there, and
    its layers do not move back and forth.
    """
    modules = [
        m for s in stages for m in s.pipeline.components.values()
        if isinstance(m, torch.nn.Module) and getattr(m, "hf_quantizer", None) is None
    ]
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    for stage in stages:
        stage.pipeline.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def _evaluator(
    cfg: RunConfig, stages: list[Stage], stage: Stage, subject: SubjectName, photos: list[LoadedImage],
    embedders, device,
) -> TrainingEvaluator:
    """Scores the cascade up to `stage` during training; its baseline is sampled now, before the stage
    trains."""
    from dreambooth.eval.during_training import TrainingEvaluator
    from dreambooth.eval.scoring import SubjectPhotos

    evaluator = TrainingEvaluator(
        pipelines=[s.pipeline for s in stages[: stages.index(stage) + 1]],
        guidance=[s.default_guidance for s in stages],
        subject=SubjectPhotos(subject.identifier, subject.class_noun, [p.image for p in photos]),
        identifier=subject.identifier, prompts=[subject.fill(p) for p in cfg.eval.eval_prompts],
        embedders=embedders, num_images=cfg.eval.num_images, steps=cfg.validation.steps,
        seed=cfg.validation.seed, autocast_dtype=DTYPES[cfg.train.mixed_precision],
    )
    with stages_on(stages[: stages.index(stage) + 1], device):
        baseline = evaluator.record_baseline()
    logger.info("stage %s before fine-tuning: %s", stage.name, baseline)
    return evaluator


def _run_info(
    cfg: RunConfig, source: ModelSource, subject: SubjectName, trained, *, status: str, outputs=None
) -> dict:
    """run.json: what a later `generate`, `eval` or `export` needs to know about the run."""
    return {
        "identifier": subject.identifier,
        "class_noun": subject.class_noun,
        "instance_prompt": subject.fill(cfg.subject.instance_prompt),
        "model": {"source": cfg.model.source, "family": source.family, "base": source.base, "sr": source.sr,
                  "upscaler": source.upscaler},
        "stages": [s.name for s in trained],
        "resolution": {s.name: s.resolution for s in trained},
        "steps": {s.name: _max_steps(cfg, s) for s in trained},
        "method": "lora" if cfg.lora.rank is not None else "full",
        "status": status,
        "outputs": outputs or {},
    }
