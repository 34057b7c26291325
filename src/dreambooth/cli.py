"""The `dreambooth` command: one function per subcommand, each only parsing and calling."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dreambooth._config_args import add_config_arguments, overrides_from_args
from dreambooth.config import RunConfig, load_config
from dreambooth.pocket.pretrain_config import PretrainFlags


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


def cmd_pocket_pretrain(args: argparse.Namespace) -> None:
    from dreambooth._config_io import from_dict
    from dreambooth.pocket.pretrain import pretrain

    cfg = from_dict(PretrainFlags, overrides_from_args(args)).pretrain
    print(f"pretrained cascade: {pretrain(cfg, export_to=args.export_to)}")


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

    pocket = commands.add_parser("pocket", help="the built-in pocket world and model").add_subparsers(dest="pocket_command", required=True)
    pre = pocket.add_parser("pretrain", help="pretrain the pocket cascade on the procedural world (resumable)")
    pre.add_argument("--export-to", type=Path, help="also copy the pretrained cascade here (e.g. src/dreambooth/pocket/weights/cascade)")
    add_config_arguments(pre, PretrainFlags)
    pre.set_defaults(func=cmd_pocket_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dreambooth.training.loop import TrainingDiverged, TrainingInterrupted

    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
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
