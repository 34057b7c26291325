"""``dreambooth dreambench``: the paper's whole protocol, one trained and evaluated model per subject.

Dataset layout (DreamBench's): one folder of photos per subject. Class nouns come from the
``subject_name,class`` table of ``prompts_and_classes.txt`` in the dataset folder, else from
:data:`~dreambooth.eval.prompts.DREAMBENCH_CLASSES`.

Output layout:

- ``runs/<subject>/``: the subject's ``dreambooth train`` run folder, trained with the given
  config (photos, class noun and run folder set per subject; class images per run), and
  ``runs/<subject>/eval/``: its ``dreambooth eval`` output.
- ``metrics.json``, ``report.html``, ``images/``: the summary over all subjects (Table 1: each
  subject weighs the same), with every subject's prompts, flags and gallery.

Rerunning the same command resumes: a subject that is trained and scored is skipped, one
that is trained is evaluated, and an interrupted training continues from its last checkpoint
(the trainer's resume). ``--overwrite`` retrains every subject; delete ``runs/*/eval`` to
re-evaluate with other evaluation settings. The summary is always rescored from the images
on disk, which is cheap next to sampling.

Several processes: under ``accelerate launch --multi_gpu --num_processes W`` (or ``torchrun``),
process r takes subjects r, r + W, ... and the main process writes the summary once every
process is done. There each subject trains in a single-process ``dreambooth train`` child on
its process's GPU: in-process, the trainer's Accelerator would join the launch's process group,
average gradients across processes that train different subjects, and write only process 0's
run folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState

from dreambooth._config_io import save_toml
from dreambooth.config import RunConfig, validate
from dreambooth.data.images import load_images
from dreambooth.eval.embedders import EmbeddingCache
from dreambooth.eval.evaluate import (
    RECORD_FILE,
    EvalRequest,
    Sampling,
    ScoringModels,
    evaluate,
    load_scorers,
    plan_eval,
    run_eval_dir,
    samples_dir,
    score,
)
from dreambooth.eval.lpips import read_lpips_weights
from dreambooth.eval.prompts import DREAMBENCH_CLASSES
from dreambooth.eval.report import write_report
from dreambooth.eval.scoring import Embedders, EvalResult, summarise
from dreambooth.files import read_json
from dreambooth.finetune import finetune
from dreambooth.layout import RunLayout
from dreambooth.models.loading import resolve_source
from dreambooth.training.loop import TrainingDiverged, TrainingInterrupted

logger = logging.getLogger(__name__)

CLASSES_FILE = "prompts_and_classes.txt"
_CLASSES_HEADER = "subject_name,class"
# Set by torchrun / accelerate launch; a child run without them is a single process.
_LAUNCH_VARIABLES = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
})  # fmt: skip

Status = Literal["new", "interrupted", "trained", "scored"]


@dataclass(frozen=True)
class BenchSubject:
    """One subject of the dataset."""

    name: str
    photos: Path
    class_noun: str


@dataclass(frozen=True)
class BenchEval:
    """How every subject is evaluated: the options of ``dreambooth eval`` that apply to all."""

    sampling: Sampling = field(default_factory=Sampling)
    models: ScoringModels = field(default_factory=ScoringModels)
    live: bool | None = None
    """Live-subject prompts (True), object prompts (False); None: by each subject's class noun."""
    max_prompts: int | None = None
    baseline: str | None = None
    """Pretrained model of the baseline row; None: the config's model."""
    use_baseline: bool = True

    def request(self, subject: BenchSubject, run_dir: Path) -> EvalRequest:
        """The evaluation of one subject's run."""
        return EvalRequest(
            subject.photos, model=str(run_dir), baseline=self.baseline, use_baseline=self.use_baseline,
            live=self.live, max_prompts=self.max_prompts,
        )


def read_class_nouns(path: Path) -> dict[str, str]:
    """The ``subject_name,class`` table of a DreamBench ``prompts_and_classes.txt``.

    Raises:
        ValueError: if the file has no such table.
    """
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if _CLASSES_HEADER not in lines:
        raise ValueError(
            f"{str(path)!r} has no {_CLASSES_HEADER!r} table (one 'subject,class noun' line per subject)"
        )
    table: dict[str, str] = {}
    for line in lines[lines.index(_CLASSES_HEADER) + 1 :]:
        if "," not in line:  # the blank line that ends the table
            break
        name, noun = line.split(",", 1)
        table[name.strip()] = noun.strip()
    return table


def find_subjects(dataset: Path, names: Sequence[str] = ()) -> list[BenchSubject]:
    """The subject folders of a dataset (all, or those in `names`), sorted by name, with class nouns.

    Raises:
        FileNotFoundError: if `dataset` is not a folder.
        ValueError: if it has no subject folder, a name is not one of them, or a subject has no class noun.
    """
    if not dataset.is_dir():
        raise FileNotFoundError(
            f"dataset folder {str(dataset)!r} does not exist (one folder of photos per subject)"
        )
    folders = {p.name: p for p in sorted(dataset.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not folders:
        raise ValueError(
            f"dataset {str(dataset)!r} has no subject folders (one folder of photos per subject)"
        )
    unknown = [name for name in names if name not in folders]
    if unknown:
        raise ValueError(
            f"dataset {str(dataset)!r} has no subject {unknown[0]!r} (found: {', '.join(folders)})"
        )
    classes_file = dataset / CLASSES_FILE
    classes = read_class_nouns(classes_file) if classes_file.is_file() else DREAMBENCH_CLASSES
    chosen = [name for name in folders if not names or name in names]
    missing = [name for name in chosen if name not in classes]
    if missing:
        raise ValueError(
            f"no class noun for subject(s) {', '.join(missing)}: add lines like '{missing[0]},dog' "
            f"under {_CLASSES_HEADER!r} in {str(classes_file)!r}"
        )
    return [BenchSubject(name, folders[name], classes[name]) for name in chosen]


def subject_config(base: RunConfig, subject: BenchSubject, out: Path) -> RunConfig:
    """`base` with the subject's photos, class noun and run folder ``out/runs/<subject>``."""
    return replace(
        base,
        subject=replace(base.subject, instance_dir=subject.photos, class_noun=subject.class_noun),
        output=replace(base.output, run_dir=out / "runs" / subject.name, resume=False),
    )


def subject_status(run_dir: Path) -> Status:
    """How far a subject got: no run yet, training interrupted, trained, or trained and scored."""
    layout = RunLayout(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    if not layout.run_info.is_file() or read_json(layout.run_info).get("status") != "done":
        return "interrupted"
    return "scored" if (run_eval_dir(run_dir) / RECORD_FILE).is_file() else "trained"


def run_dreambench(
    dataset: Path, config: RunConfig, out: Path, *, subjects: Sequence[str] = (),
    evaluation: BenchEval = BenchEval(),
) -> EvalResult | None:
    """Train and evaluate every subject of `dataset` (this process's share), then summarise.

    Args:
        dataset: DreamBench-layout folder (module docstring).
        config: Training config for every subject; its photos, class noun and run folder are set per subject.
        out: Output folder (module docstring).
        subjects: Only these subject folders; empty: all.
        evaluation: How each subject is evaluated.

    Returns:
        The summary over all subjects on the main process; None on the others.

    Raises:
        ValueError / FileNotFoundError: for any problem with the dataset, config or models,
            before anything trains.
    """
    chosen = find_subjects(dataset, subjects)
    configs = [subject_config(config, subject, out) for subject in chosen]
    _check_inputs(config, chosen, configs)
    if evaluation.models.lpips_weights is not None:
        read_lpips_weights(evaluation.models.lpips_weights)
    state = _process_state()
    sampling = replace(evaluation.sampling, device=evaluation.sampling.device or str(state.device))
    evaluation = replace(evaluation, sampling=sampling)
    embedders = load_scorers(evaluation.models, sampling.device, model_source=config.model.source)
    cache = EmbeddingCache()
    mine = list(zip(chosen, configs))[state.process_index :: state.num_processes]
    for position, (subject, cfg) in enumerate(mine, 1):
        logger.info("[%d/%d] %s (%s)", position, len(mine), subject.name, subject.class_noun)
        _run_subject(subject, cfg, state, evaluation, embedders, cache)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    requests = [
        _from_samples(evaluation.request(subject, cfg.run_dir)) for subject, cfg in zip(chosen, configs)
    ]
    summary = summarise([score(plan_eval(request), embedders, cache) for request in requests], embedders)
    write_report(summary, out)
    return summary


def _check_inputs(base: RunConfig, subjects: list[BenchSubject], configs: list[RunConfig]) -> None:
    """Fail before anything trains: every subject's config and photos, and the model."""
    leftovers = {
        "subject.instance_dir": base.subject.instance_dir, "subject.class_noun": base.subject.class_noun,
        "output.run_dir": base.output.run_dir, "output.resume": base.output.resume or None,
    }  # fmt: skip
    for key, value in leftovers.items():
        if value is not None:
            logger.warning(
                "%s = %r is ignored: dreambench sets it per subject (and resumes by itself)", key, value
            )
    if base.prior.enabled and base.prior.class_dir is not None and len({s.class_noun for s in subjects}) > 1:
        raise ValueError(
            f"prior.class_dir {str(base.prior.class_dir)!r} would be shared by subjects of different "
            "classes; leave it unset so that every run keeps its own class images"
        )
    for cfg in configs:
        validate(cfg)
        load_images(cfg.subject.instance_dir, on_bad_file=cfg.subject.on_bad_file)
    resolve_source(base.model)


def _process_state() -> PartialState:
    """This process's place in the launch: one process unless started by accelerate launch/torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return PartialState()
    # gloo, with a long timeout: the processes only wait for each other, possibly for a whole
    # subject's training, where NCCL's default timeout (10 minutes) would end the launch.
    return PartialState(cpu=not torch.cuda.is_available(), backend="gloo", timeout=timedelta(days=7))


def _run_subject(
    subject: BenchSubject, cfg: RunConfig, state: PartialState, evaluation: BenchEval, embedders: Embedders,
    cache: EmbeddingCache,
) -> None:
    status: Status = "new" if cfg.output.overwrite else subject_status(cfg.run_dir)
    if status == "scored":
        logger.info("%s: trained and scored; skipping (delete %s to redo it)", subject.name, cfg.run_dir)
        return
    if status != "trained":
        logger.info("%s: %s", subject.name, "resuming training" if status == "interrupted" else "training")
        _train(replace(cfg, output=replace(cfg.output, resume=status == "interrupted")), state)
    logger.info("%s: evaluating", subject.name)
    evaluate(plan_eval(evaluation.request(subject, cfg.run_dir)), embedders, evaluation.sampling, cache)


def _from_samples(request: EvalRequest) -> EvalRequest:
    """The same evaluation, scored from the images it wrote."""
    out = run_eval_dir(Path(request.model))
    pretrained = samples_dir(out, "pretrained")
    return replace(
        request, images=samples_dir(out, "finetuned"), baseline=None,
        baseline_images=pretrained if pretrained.is_dir() else None, use_baseline=pretrained.is_dir(),
    )


def _train(cfg: RunConfig, state: PartialState) -> None:
    if state.num_processes == 1:
        finetune(cfg)
        return
    # A single-process trainer in a child, on this process's device (module docstring).
    config_file = cfg.run_dir.parent / f".{cfg.run_dir.name}.train.toml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    save_toml(cfg, config_file)
    env = {
        k: v for k, v in os.environ.items()
        if k not in _LAUNCH_VARIABLES and not k.startswith(("TORCHELASTIC_", "ACCELERATE_"))
    }
    if state.device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = gpus[state.device.index]
    command = [sys.executable, "-m", "dreambooth.cli", "train", "--config", str(config_file)]
    try:
        with subprocess.Popen(command, env=env) as child:
            code = _wait(child)
    finally:
        config_file.unlink()  # the run folder keeps its own copy: config.resolved.toml
    if code != 0:
        error = {130: TrainingInterrupted, 3: TrainingDiverged}.get(code, RuntimeError)
        raise error(
            f"training {str(cfg.run_dir)!r} stopped with exit code {code} (its messages are above); rerun to "
            "resume"
        )


def _wait(child: subprocess.Popen) -> int:
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save a checkpoint and stop
            continue
