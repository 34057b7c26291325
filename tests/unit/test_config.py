"""The config tree: files, flags and Python build the same RunConfig; mistakes are named."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest

from dreambooth._config_args import add_config_arguments, flag_name, overrides_from_args, sections
from dreambooth._config_io import field_docs, from_dict, load_file, save_toml
from dreambooth.cli import build_parser
from dreambooth.config import RunConfig, load_config, validate

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def _all_fields():
    for section, cls in sections(RunConfig):
        for field in dataclasses.fields(cls):
            yield section, cls, field


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path, {"subject": {"instance_dir": "photos", "class_noun": "dog"}})
    validate(cfg, has_gpu=True)  # the GPU configs ask for fp16: a property of the machine, not of the file


def test_shipped_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"sd15_full.toml", "sd15_lora.toml", "pocket.toml", "if_cascade.toml"}


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('[train]\nmax_steps = 50\nbatch_size = 2\n[lora]\nrank = 4\n')
    args = build_parser().parse_args([
        "train", "--config", str(file), "--max-steps", "7", "--prior.loss_weight", "0.5",
    ])
    cfg = load_config(args.config, overrides_from_args(args))
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.lora.rank, cfg.prior.loss_weight) == (7, 2, 4, 0.5)
    assert cfg.train.gradient_accumulation_steps == RunConfig().train.gradient_accumulation_steps


def test_yaml_files_work_like_toml(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("train:\n  max_steps: 12\nsubject:\n  class_noun: cat\n")
    cfg = load_config(file)
    assert (cfg.train.max_steps, cfg.subject.class_noun) == (12, "cat")


def test_unknown_key_is_named_with_the_closest_suggestion(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text("[train]\nmax_step = 5\n")
    with pytest.raises(
        ValueError, match=r"unknown config key 'train.max_step'; did you mean 'train.max_steps'"
    ):
        load_config(file)


def test_key_in_the_wrong_section_says_where_it_belongs() -> None:
    with pytest.raises(ValueError, match=r"'prior.num_class_images' \(it belongs in the \[prior\] section\)"):
        load_config(overrides={"num_class_images": 10})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"max_steps": "400"}}, "'train.max_steps' must be int, got str"),
        ({"train": {"mixed_precision": "fp8"}},
         "'train.mixed_precision' must be one of 'no', 'fp16', 'bf16'"),
        ({"lora": {"rank": 0}}, "lora.rank must be > 0"),
        ({"train": {"train_text_encoder": 1}}, "'train.train_text_encoder' must be bool"),
        ({"cascade": {"noise_level_range": [5]}}, "must have 2 items"),
    ],
)
def test_wrong_values_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(overrides=overrides)


def test_validate_reports_every_problem_at_once() -> None:
    cfg = load_config(
        overrides={"output": {"resume": True, "overwrite": True}, "subject": {"instance_prompt": "a {thing}"}}
    )
    with pytest.raises(ValueError) as error:
        validate(cfg)
    text = str(error.value)
    for expected in ("instance_dir is required", "class_noun is required", "contradict", "{thing}"):
        assert expected in text


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(
        overrides={
            "subject": {"instance_dir": "x", "class_noun": "dog"}, "lora": {"rank": 8},
            "train": {"ema_decay": 0.99},
        }
    )
    save_toml(cfg, tmp_path / "resolved.toml")
    assert from_dict(RunConfig, load_file(tmp_path / "resolved.toml")) == cfg


def test_optional_fields_default_to_none() -> None:
    """TOML has no null: an Optional field with another default could not be written back."""
    for section, cls, field in _all_fields():
        hint = typing.get_type_hints(cls)[field.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
            assert field.default is None, f"{section}.{field.name}"


def test_every_field_has_a_unique_flag_and_help() -> None:
    flags = [flag_name(field) for _, _, field in _all_fields()]
    assert len(flags) == len(set(flags)), "two config fields share a flag"
    for section, cls, field in _all_fields():
        assert field_docs(cls).get(field.name), (
            f"{section}.{field.name} has no docstring (it is the --help text)"
        )
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for section, _ in sections(RunConfig):
        assert f"{section} options" in help_text


def test_a_config_subclass_keeps_the_help_of_the_fields_it_inherits() -> None:
    from dreambooth.pocket.settings import AblationConfig, DemoConfig

    inherited, parent = field_docs(AblationConfig), field_docs(DemoConfig)
    assert set(inherited) == {field.name for field in dataclasses.fields(AblationConfig)}
    assert inherited["subject"] == parent["subject"]
    assert inherited["sr_steps"] != parent["sr_steps"]  # redeclared with its own default and doc


def test_argument_groups_accept_dotted_and_short_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RunConfig)
    args = parser.parse_args([
        "--lora.rank", "4", "--no-prior-preservation", "--validation-prompts", "a", "b", "--class-guidance",
        "none",
    ])
    assert overrides_from_args(args) == {
        "lora": {"rank": 4}, "prior": {"enabled": False, "guidance_scale": None},
        "validation": {"validation_prompts": ["a", "b"]},
    }
