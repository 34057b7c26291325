"""The `dreambooth` command: one function per subcommand, each only parsing and calling."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TypeVar

from dreambooth._config_args import add_config_arguments, overrides_from_args
from dreambooth._config_io import from_dict, load_tree
from dreambooth.config import RunConfig, load_config
from dreambooth.options import BenchFlags, EvalFlags, ExportFlags, GenerateFlags, ScoringModels
from dreambooth.pocket.settings import (
    AblationFlags,
    DemoFlags,
    PretrainFlags,
    QualityFlags,
    ScorerTrainingFlags,
)

T = TypeVar("T")


def cmd_train(args: argparse.Namespace) -> None:
    from dreambooth.finetune import finetune

    cfg = load_config(args.config, overrides_from_args(args))
    args.crash_log_dir = cfg.run_dir / "logs"  # where an unexpected error's traceback goes
    layout = finetune(cfg)
    outputs = {"pipeline": layout.pipeline, "LoRA": layout.root / "lora", "samples": layout.root / "samples"}
    written = [f"{name} in {path}" for name, path in outputs.items() if path.exists()]
    print(f"done: {layout.root}" + (f" ({', '.join(written)})" if written else ""))


def cmd_generate(args: argparse.Namespace) -> None:
    from dreambooth.generate import generate_to_folder, read_prompts

    flags = _options(GenerateFlags, args)
    request = flags.generate
    prompts = read_prompts(request.prompts, request.prompts_file)
    out = generate_to_folder(request.model, prompts, request.out, lora=request.lora, sampling=flags.sampling)
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from dreambooth.export.command import export

    print(f"wrote {export(_options(ExportFlags, args).export)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from dreambooth.demo import run_demo

    run_demo(_options(DemoFlags, args).demo)


def cmd_pocket_ablation(args: argparse.Namespace) -> None:
    from dreambooth.ablation import run_ablation

    run_ablation(_options(AblationFlags, args).demo)


def cmd_pocket_train_scorer(args: argparse.Namespace) -> None:
    import torch

    from dreambooth.pocket.scorers import train_scorer

    cfg = _options(ScorerTrainingFlags, args).scorer
    torch.set_num_threads(cfg.threads)
    print(train_scorer(cfg.out, cfg.seed, cfg.steps))


def cmd_pocket_quality(args: argparse.Namespace) -> None:
    from dreambooth.files import write_json
    from dreambooth.generate import load_model
    from dreambooth.pocket.quality import (
        base_accuracy,
        super_resolution_agreement,
        super_resolution_reads_input,
    )
    from dreambooth.pocket.scorers import PocketScorer

    cfg = _options(QualityFlags, args).quality
    model = load_model(cfg.model, device="cpu")
    report = {
        "base": base_accuracy(model, PocketScorer.load()),
        "super_resolution": super_resolution_agreement(model),
        "super_resolution_reads_input": super_resolution_reads_input(model),
    }
    print(report)
    if cfg.out:
        write_json(cfg.out, report)


def cmd_pocket_pretrain(args: argparse.Namespace) -> None:
    from dreambooth.pocket.pretrain import pretrain

    print(f"pretrained cascade: {pretrain(_options(PretrainFlags, args).pretrain)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from dreambooth.eval.evaluate import run_eval, table_text

    flags = _options(EvalFlags, args)
    result, report = run_eval(flags.request, flags.sampling, flags.eval, flags.thresholds)
    print(f"{table_text(result.rows, result.columns)}\nreport: {report}")


def cmd_dreambench(args: argparse.Namespace) -> None:
    from dreambooth.dreambench import BenchEval, run_dreambench
    from dreambooth.eval.evaluate import table_text

    cfg = load_config(args.config, overrides_from_args(args, RunConfig))
    flags = from_dict(BenchFlags, overrides_from_args(args, BenchFlags))
    bench = flags.bench
    evaluation = BenchEval(
        flags.sampling, ScoringModels.of(cfg.eval, flags.scoring.lpips_weights), live=bench.live,
        max_prompts=bench.max_prompts, baseline=bench.baseline, use_baseline=bench.use_baseline,
    )
    summary = run_dreambench(bench.dataset, cfg, bench.out, subjects=bench.subjects, evaluation=evaluation)
    if summary is not None:
        print(f"{table_text(summary.rows, summary.columns)}\nreport: {bench.out / 'report.html'}")


def _options(root: type[T], args: argparse.Namespace) -> T:
    """The option tree `root` of a command: defaults, then its --config file, then the flags given."""
    return load_tree(root, getattr(args, "config", None), overrides_from_args(args, root))


def _command(commands, name: str, root: type | None, func, **texts) -> argparse.ArgumentParser:
    """A subcommand whose flags come from the option tree `root` (and a --config file of it)."""
    parser = commands.add_parser(name, **texts)
    if root is not None:
        parser.add_argument(
            "--config", type=Path,
            help="TOML or YAML file with the same sections as the flags (flags override it)",
        )
        add_config_arguments(parser, root)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreambooth", description="Personalise text-to-image diffusion models (DreamBooth)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="fine-tune a model on 3-5 photos of a subject",
        description="Fine-tune a model on photos of a subject. Settings come from defaults, then --config, "
                    "then flags.",
    )
    train.add_argument("--config", type=Path, help="TOML or YAML config file (flags override it)")
    add_config_arguments(train, RunConfig)
    train.set_defaults(func=cmd_train)

    _command(
        commands, "generate", GenerateFlags, cmd_generate, help="sample a model, a run folder or a LoRA",
        description="Write PNGs and a grid.",
    )

    _command(
        commands, "export", ExportFlags, cmd_export,
        help="write a run's weights for diffusers, ComfyUI or AUTOMATIC1111/Forge",
        description="Write a run's finished weights (or one of its checkpoints) in one format; every input "
        "is checked before any weights load.",
    )

    _command(
        commands, "eval", EvalFlags, cmd_eval,
        help="score a model on DreamBench's prompts (DINO, CLIP-I, CLIP-T, PRES, DIV) with an HTML report",
        description="Sample MODEL on the paper's 25 prompts and 'a [class noun]' (or score --images), beside "
        "its pretrained base; write metrics.json, report.html and the samples into --out.",
    )

    bench = _command(
        commands, "dreambench", None, cmd_dreambench,
        help="train and evaluate every subject of a DreamBench-layout dataset; summary table",
        description="Train each subject folder of DATASET with --config and the training flags, evaluate it, "
        "and write a Table-1 summary into --out. Rerun to resume; under `accelerate launch` subjects are "
        "spread over processes. DINO and CLIP are the training config's (--eval-dino, --eval-clip).",
    )
    bench.add_argument(
        "--config", type=Path, help="training config of every subject (TOML or YAML; flags override it)"
    )
    add_config_arguments(bench, BenchFlags)
    add_config_arguments(bench, RunConfig)

    _command(
        commands, "demo", DemoFlags, cmd_demo,
        help="DreamBooth end to end on the built-in pocket model (CPU, a few minutes)",
        description="Personalise the built-in pocket cascade to a pocket subject and show before/after "
        "samples and scores.",
    )

    pocket = commands.add_parser("pocket", help="the built-in pocket world and model").add_subparsers(
        dest="pocket_command", required=True
    )
    _command(
        pocket, "pretrain", PretrainFlags, cmd_pocket_pretrain,
        help="pretrain the pocket cascade on the procedural world (resumable)",
    )
    _command(
        pocket, "quality", QualityFlags, cmd_pocket_quality,
        help="class/context accuracy of base samples; SR vs bilinear upsampling",
    )
    _command(
        pocket, "train-scorer", ScorerTrainingFlags, cmd_pocket_train_scorer,
        help="retrain the pocket world's scorer network (deterministic, ~6 min on 1 CPU thread)",
    )
    _command(
        pocket, "ablation", AblationFlags, cmd_pocket_ablation,
        help="the paper's prior-preservation ablation and SR finding, in miniature (resumable)",
        description="Personalise every ready subject and new ones, with and without prior preservation; "
                    "average the scores.",
    )

    return parser


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""What a wrong input raises: the message names the file or flag and what to do, so no traceback is shown."""

def main(argv: list[str] | None = None) -> int:
    """Run a command; return its exit code: 0 done, 2 a wrong input, 3 diverged, 130 interrupted, 1 a bug."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "PIL", "accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dreambooth.training.loop import TrainingDiverged, TrainingInterrupted

    try:
        args.func(args)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except TrainingInterrupted as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the training loop, which checkpoints first (TrainingInterrupted)
        if args.debug:
            raise
        print(
            "stopped: interrupted. What was finished is kept (class images, checkpoints, samples): run the "
            "same command again to continue (a run that had begun training: with --resume)", file=sys.stderr,
        )
        return 130
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    # a bug, or a failure the checks did not foresee: one line, the traceback in a file
    except Exception as error:
        if args.debug:
            raise
        log = _write_traceback(getattr(args, "crash_log_dir", None))
        print(f"error: {type(error).__name__}: {error}\n"
              f"This is not an input the checks know of. The full traceback is in {log}; rerun with --debug "
              "to see it here, "
              "and please report it on the project's issue tracker with that file attached", file=sys.stderr)
        return 1
    return 0


def _write_traceback(folder: Path | None) -> Path:
    """Write the current exception's traceback into `folder` (a run's logs/), else the temporary folder."""
    import tempfile
    import time
    import traceback

    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    for where in ([folder] if folder is not None else []) + [Path(tempfile.gettempdir())]:
        try:
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text(traceback.format_exc(), encoding="utf-8")
            return where / name
        except OSError:
            continue
    return Path("(not written)")


if __name__ == "__main__":
    sys.exit(main())
