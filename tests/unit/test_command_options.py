"""Every command's flags come from its typed option tree: help, defaults, files, all problems at once."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest

from dreambooth._config_args import _show, flag_name, overrides_from_args, sections
from dreambooth._config_io import ConfigError, from_dict, load_file
from dreambooth.cli import _options, build_parser
from dreambooth.config import DEFAULT_CLIP, DEFAULT_DINO, EvalConfig, RunConfig, resolve, validate
from dreambooth.options import BenchFlags, EvalFlags, GenerateFlags, Sampling, ScoringModels
from dreambooth.pocket.settings import (
    AblationFlags,
    DemoFlags,
    PretrainConfig,
    PretrainFlags,
    QualityFlags,
    ScorerTrainingFlags,
)
from dreambooth.run_folder import open_run_folder, record_config

COMMANDS = {
    "train": [RunConfig], "generate": [GenerateFlags], "eval": [EvalFlags],
    "dreambench": [BenchFlags, RunConfig],
    "demo": [DemoFlags], "pocket pretrain": [PretrainFlags], "pocket quality": [QualityFlags],
    "pocket train-scorer": [ScorerTrainingFlags], "pocket ablation": [AblationFlags],
}  # fmt: skip


def _help(command: str) -> str:
    parser = build_parser()
    for name in command.split():
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return " ".join(parser.format_help().split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_option_with_its_dataclass_default(command: str) -> None:
    text = _help(command)
    for root in COMMANDS[command]:
        meta = {f.name: f.metadata for f in dataclasses.fields(root)}
        for section, cls in sections(root):
            for field in dataclasses.fields(cls):
                if "fields" in meta[section] and field.name not in meta[section]["fields"]:
                    continue
                name = (
                    field.name.upper() if field.metadata.get("positional")
                    else f"--{meta[section].get('flag_prefix', '')}{flag_name(field)}"
                )
                default = (
                    field.default if field.default is not dataclasses.MISSING else field.default_factory()
                )
                shown = " ".join(f"(default: {_show(default)})".split())
                assert f"{name} " in text, f"{command}: {name} missing"
                assert shown in text[text.index(f"{name} ") :], f"{command}: {name} lacks {shown}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_a_command_is_a_field_of_its_option_tree(command: str) -> None:
    """No hand-written flags: each one a command takes sets a field of its tree (besides --config/help)."""
    parser = build_parser()
    for name in command.split():
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    fields = {
        f"{section}.{field.name}" for root in COMMANDS[command] for section, cls in sections(root)
        for field in dataclasses.fields(cls)
    }
    stray = [
        action.option_strings or [action.dest] for action in parser._actions
        if action.dest not in fields and action.dest not in {"help", "config"}
    ]
    assert not stray, f"{command}: flags outside its option tree: {stray}"


def test_defaults_are_written_once() -> None:
    assert (
        ScoringModels().dino == EvalConfig().dino == DEFAULT_DINO
        and ScoringModels().clip == EvalConfig().clip == DEFAULT_CLIP
    )
    assert "--sampler {dpm++,ddpm,ddim,euler_a}" in _help(
        "generate"
    ) and "--bench-sampler {dpm++,ddpm,ddim,euler_a}" in _help("dreambench")


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_the_existing_flags_still_parse() -> None:
    flags = _options(
        GenerateFlags,
        _parse([
            "generate", "--model", "m", "--prompt", "a", "--prompt", "b", "--num-images", "2", "--steps", "3",
            "--out", "o",
        ]),
    )
    assert (flags.generate.prompts, flags.sampling.num_images, flags.sampling.steps, flags.generate.out) == (
        ("a", "b"), 2, 3, Path("o"),
    )

    argv = ["eval", "run", "--subject-dir", "p", "--object", "--no-baseline", "--max-prompts", "2",
            "--eval-dino", "d", "--eval.clip", "c", "--device", "cpu", "--sampler", "ddim",
            "--lpips-weights", "w.ckpt", "--eval-embedders", "paper"]  # fmt: skip
    flags = _options(EvalFlags, _parse(argv))
    request = flags.request
    assert (request.model, request.subject_dir, request.live, request.use_baseline, request.max_prompts) == (
        "run", Path("p"), False, False, 2,
    )
    assert flags.eval == ScoringModels("d", "c", Path("w.ckpt"), "paper")
    assert (flags.sampling.device, flags.sampling.sampler) == ("cpu", "ddim")
    assert _options(EvalFlags, _parse(["eval", "--subject-dir", "p", "--live"])).request.live is True

    args = _parse([
        "dreambench", "data", "--bench-num-images", "2", "--bench-steps", "3", "--seed", "5", "--subjects",
        "a", "b", "--live",
    ])
    bench = from_dict(BenchFlags, overrides_from_args(args, BenchFlags))
    assert (
        bench.bench.dataset, bench.bench.subjects, bench.bench.live, bench.sampling.num_images,
        bench.sampling.steps,
    ) == (Path("data"), ("a", "b"), True, 2, 3)
    # the training seed, not the sampling one
    assert overrides_from_args(args, RunConfig) == {"train": {"seed": 5}}

    scorer = _options(
        ScorerTrainingFlags, _parse(["pocket", "train-scorer", "--steps", "10", "--threads", "2"])
    ).scorer
    assert (scorer.steps, scorer.threads, scorer.seed) == (10, 2, 0)
    assert _options(QualityFlags, _parse(["pocket", "quality", "--model", "x"])).quality.model == "x"


def test_live_and_object_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        _parse(["eval", "--live", "--object"])


def test_generate_and_eval_read_a_config_file_and_flags_override_it(tmp_path: Path) -> None:
    file = tmp_path / "generate.toml"
    file.write_text(
        '[generate]\nmodel = "pocket"\nprompts = ["a cube", "a ball"]\n[sampling]\nsteps = 7\nseed = 3\n'
    )
    flags = _options(GenerateFlags, _parse(["generate", "--config", str(file), "--seed", "4"]))
    assert (flags.generate.model, flags.generate.prompts, flags.sampling.steps, flags.sampling.seed) == (
        "pocket", ("a cube", "a ball"), 7, 4,
    )

    file = tmp_path / "eval.yaml"
    file.write_text(
        "request:\n  model: runs/dog\n  subject_dir: photos\n  live: false\neval:\n  dino: my/dino\n"
    )
    flags = _options(EvalFlags, _parse(["eval", "--config", str(file), "--max-prompts", "3"]))
    assert (
        flags.request.model, flags.request.subject_dir, flags.request.live, flags.request.max_prompts,
    ) == ("runs/dog", Path("photos"), False, 3)
    assert flags.eval.dino == "my/dino" and flags.eval.clip == DEFAULT_CLIP


def test_a_config_file_through_the_cli_fails_listing_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dreambooth.cli import main

    file = tmp_path / "eval.toml"
    file.write_text('[request]\nsubject_dirr = "p"\n[sampling]\nstep = 3\nsampler = "heun"\n')
    assert main(["eval", "--config", str(file)]) == 2
    err = capsys.readouterr().err
    assert (
        "'request.subject_dirr'" in err and "'sampling.step'" in err
        and "'sampling.sampler' must be one of" in err
    )


def test_a_file_with_three_wrong_keys_reports_all_three(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('[train]\nmax_step = 5\n[lora]\nrnk = 4\n[subject]\nresolution = "big"\n')
    with pytest.raises(ConfigError) as error:
        from_dict(RunConfig, load_file(file))
    assert len(error.value.problems) == 3
    message = str(error.value)
    assert "'train.max_step'" in message and "'lora.rnk'" in message and "'subject.resolution'" in message


def test_bad_values_in_several_sections_and_fields_are_all_reported() -> None:
    data = {"train": {"max_steps": 0, "batch_size": 0}, "lora": {"rank": -1}, "prior": {"loss_weight": -1.0}}
    with pytest.raises(ConfigError) as error:
        from_dict(RunConfig, data)
    assert len(error.value.problems) == 4
    with pytest.raises(ConfigError) as error:
        Sampling(num_images=0, steps=0)
    assert len(error.value.problems) == 2


def test_validate_rejects_fp16_without_a_gpu_along_with_other_problems() -> None:
    cfg = from_dict(RunConfig, {"train": {"mixed_precision": "fp16"}})
    with pytest.raises(ValueError) as error:
        validate(cfg, has_gpu=False)
    assert "'fp16' needs a GPU" in str(error.value) and "subject.instance_dir is required" in str(error.value)
    ok = from_dict(
        RunConfig,
        {"train": {"mixed_precision": "fp16"}, "subject": {"instance_dir": "p", "class_noun": "dog"}},
    )
    validate(ok, has_gpu=True)


def test_bf16_without_a_gpu_warns_that_fp32_is_faster(caplog) -> None:
    cfg = from_dict(
        RunConfig,
        {"train": {"mixed_precision": "bf16"}, "subject": {"instance_dir": "p", "class_noun": "dog"}},
    )
    with caplog.at_level(logging.WARNING):
        validate(cfg, has_gpu=True)
        assert "bf16" not in caplog.text
        validate(cfg, has_gpu=False)
    assert "'bf16' without a GPU" in caplog.text and "--mixed-precision no" in caplog.text


def test_pretrain_settings_are_fields_with_the_old_defaults() -> None:
    cfg = PretrainConfig()
    assert (cfg.checkpoint_every, cfg.keep_checkpoints, cfg.lr_scheduler, cfg.weight_decay) == (
        250, 2, "cosine", 0.0,
    )
    assert (cfg.preview_every, cfg.preview_steps, cfg.preview_guidance) == (1000, 25, 4.0)
    args = _parse([
        "pocket", "pretrain", "--checkpoint-every", "10", "--preview-guidance", "2", "--lr-scheduler",
        "constant",
    ])
    cfg = _options(PretrainFlags, args).pretrain
    assert (cfg.checkpoint_every, cfg.preview_guidance, cfg.lr_scheduler) == (10, 2.0, "constant")
    with pytest.raises(ValueError, match="pretrain.keep_checkpoints must be >= 1"):
        PretrainConfig(keep_checkpoints=0)


def test_resolved_config_holds_the_learning_rates_and_the_identifier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = {"subject": {"instance_dir": "photos", "class_noun": "dog"}, "lora": {"rank": 4},
            "train": {"train_text_encoder": True}, "optim": {"text_encoder_learning_rate": 5e-5},
            "output": {"run_dir": str(tmp_path / "run")}}  # fmt: skip
    cfg = from_dict(RunConfig, data)
    layout, resuming = open_run_folder(cfg)
    # opening writes nothing; the command records the config once its inputs hold
    assert not layout.config.exists()
    record_config(layout, cfg)
    saved = load_file(layout.config)
    assert saved["optim"]["learning_rate"] == 1e-4  # the LoRA default
    assert (
        saved["optim"]["text_encoder_learning_rate"] == 5e-5
        and saved["optim"]["text_encoder_2_learning_rate"] == 5e-5
    )
    assert "identifier" not in saved["identifier"]
    record_config(layout, cfg, "xon")
    reloaded = from_dict(RunConfig, load_file(layout.config))
    assert reloaded.identifier.identifier == "xon" and reloaded == resolve(cfg, "xon")

    caplog.set_level(logging.WARNING, logger="dreambooth")  # resuming with the same flags changes nothing
    open_run_folder(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, resume=True)))
    assert not [r for r in caplog.records if "resume:" in r.getMessage()]


def test_resolving_keeps_explicit_values_and_frozen_text_encoders_unset() -> None:
    cfg = from_dict(RunConfig, {"optim": {"learning_rate": 2e-6}})
    resolved = resolve(cfg)
    assert resolved.optim.learning_rate == 2e-6 and resolved.optim.text_encoder_learning_rate is None
    assert resolve(RunConfig()).optim.learning_rate == 5e-6 and resolve(RunConfig()).output.run_dir == Path(
        "runs/dreambooth"
    )
