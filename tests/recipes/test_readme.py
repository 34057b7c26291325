"""The README stays true: its commands, flags, links and Python example match the code.

Every `dreambooth ...` command in the README's ```bash blocks (also under `accelerate launch` /
`torchrun ... -m dreambooth.cli`) is parsed by the real CLI parser, and what `train`,
`dreambench` would build from it is built: `--config` files exist and load, a `train` config
validates. Nothing trains: most of these commands need a GPU and real weights.
So this checks that the commands stay true to the CLI (flags, subcommands, config files), not
that they train. The README's Python example does run, on a tiny Stable Diffusion, with the
config file and paths it names swapped for a tiny config and temporary folders.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import tomllib

from dreambooth._config_args import overrides_from_args
from dreambooth.cli import build_parser
from dreambooth.config import RunConfig, load_config, validate

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, ROOT / "docs" / "pocket.md"]

# Flags of other programs the README shows (pip, accelerate, torchrun, the bench script).
OTHER_TOOLS_FLAGS = {
    "--no-deps", "--multi_gpu", "--num_processes", "--nproc_per_node", "--data", "--dino", "--clip",
    "--bench-", "--diffusers-script", "--workload",
}


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, `a && b` split."""
    joined = re.sub(r"\\\n", " ", block)
    return [part.strip() for line in joined.splitlines() for part in line.split("&&") if part.strip()]


def _dreambooth_argv(command: str) -> list[str] | None:
    """The arguments after `dreambooth` or `-m dreambooth.cli`, or None for another program."""
    words = shlex.split(command, comments=True)
    if words and words[0] == "dreambooth":
        return words[1:]
    if "dreambooth.cli" in words:
        return words[words.index("dreambooth.cli") + 1 :]
    return None


def readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    commands = [_dreambooth_argv(c) for block in _blocks(text, "bash") for c in _shell_commands(block)]
    return [c for c in commands if c is not None]


def _parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as error:  # argparse prints why on stderr
        pytest.fail(f"`dreambooth {shlex.join(argv)}` does not parse (exit {error.code}); see stderr")


def _config_path(args: argparse.Namespace) -> Path | None:
    if getattr(args, "config", None) is None:
        return None
    path = ROOT / args.config
    assert path.is_file(), f"--config {args.config} does not exist"
    return path


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_each_readme_command_parses_and_its_config_loads(argv: list[str]) -> None:
    args = _parse(argv)
    config = _config_path(args)
    if args.command in ("train", "dreambench"):  # the training config every subject of `dreambench` gets
        cfg = load_config(config, overrides_from_args(args, RunConfig))
        if args.command == "train":
            validate(cfg)


def test_the_readme_shows_every_user_facing_subcommand() -> None:
    shown = {argv[0] for argv in readme_commands()}
    assert {"train", "generate", "export", "eval", "dreambench", "demo"} <= shown


def test_the_two_set_up_commands_come_first() -> None:
    """CI runs, verbatim, the README line that starts `python3 -m venv` and contains `pytest`."""
    first, second = _blocks(README.read_text(encoding="utf-8"), "bash")[:2]
    assert first.startswith("python3 -m venv") and first.rstrip().endswith("dreambooth demo")
    assert second.startswith("python3 -m venv") and second.rstrip().endswith("pytest -q")
    ci_lines = [
        line for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("python3 -m venv") and "pytest" in line
    ]
    assert len(ci_lines) == 1


def test_scripts_the_readme_runs_exist() -> None:
    text = README.read_text(encoding="utf-8")
    commands = [shlex.split(c, comments=True) for b in _blocks(text, "bash") for c in _shell_commands(b)]
    scripts = [w[1] for w in commands if w[:1] in (["python"], ["python3"]) and w[1].endswith(".py")]
    assert scripts, "the README runs no script: update this test"
    for script in scripts:
        assert (ROOT / script).is_file(), script


def _all_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _all_flags(sub)
    return flags


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_named_in_the_docs_exists(doc: Path) -> None:
    known = _all_flags(build_parser()) | OTHER_TOOLS_FLAGS
    named = set(re.findall(r"(?<![\w-])--[a-z][\w.-]*", doc.read_text(encoding="utf-8")))
    named = {flag.rstrip(".") if flag.rstrip(".") in known else flag for flag in named}
    assert not named - known, f"{doc.name} names flags the CLI does not have: {sorted(named - known)}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(
        r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), flags=re.M
    )
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_and_figure_resolves(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link {target} points to a missing file"
        if anchor:
            assert anchor in _anchors(file.read_text(encoding="utf-8")), (
                f"{doc.name}: no heading for #{anchor} in {file.name}"
            )


def test_the_toml_example_is_the_config_file_it_names() -> None:
    (example,) = _blocks(README.read_text(encoding="utf-8"), "toml")
    shown, real = (
        tomllib.loads(example),
        tomllib.loads((ROOT / "configs" / "sd15_full.toml").read_text(encoding="utf-8")),
    )
    for section, values in shown.items():
        assert values.items() <= real[section].items(), section


TINY_CONFIG = """
[model]
source = "{model}"
[prior]
num_class_images = 2
steps = 2
batch_size = 2
[train]
max_steps = 2
[validation]
every_n_steps = 0
num_images = 1
steps = 2
[checkpoint]
every_n_steps = 0
[output]
logger = "none"
"""


def test_the_python_example_runs_on_a_tiny_model(tiny_sd: Path, photos: Path, tmp_path: Path) -> None:
    """The README's Python block, with its config file, photos and run folder swapped for a tiny
    Stable Diffusion config, synthetic photos and a temporary folder."""
    examples = [b for b in _blocks(README.read_text(encoding="utf-8"), "python") if "finetune(" in b]
    assert len(examples) == 1, "expected one Python example calling finetune()"
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_CONFIG.format(model=tiny_sd.as_posix()), encoding="utf-8")
    run = tmp_path / "runs" / "my_dog"
    code = examples[0]
    for shown, actual in [
        ('"configs/sd15_full.toml"', repr(config.as_posix())), ('"photos/my_dog"', repr(photos.as_posix())),
        ('"runs/my_dog"', repr(run.as_posix())),
    ]:
        assert shown in code, f"the example no longer mentions {shown}: update this test"
        code = code.replace(shown, actual)
    exec(compile(code, f"{README}:python", "exec"), {"__name__": "readme_example"})
    assert (run / "pipeline" / "model_index.json").is_file()
    assert (run / "beach.png").is_file()
