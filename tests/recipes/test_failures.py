"""Nothing a user can do wrong ends in a traceback, and a command that fails changes nothing.

Each wrong file is fed to the commands' file arguments: the command exits 2 before any weights
load, names the file as the user typed it, prints no traceback, and leaves no output behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

import dreambooth.finetune
from dreambooth.cli import main

WRONG_FILES: dict[str, Callable[[Path], Path]] = {
    "missing": lambda tmp: tmp / "nowhere.safetensors",
    "empty": lambda tmp: _write(tmp / "empty.safetensors", b""),
    "truncated": lambda tmp: _write(tmp / "cut.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\""),
    "binary": lambda tmp: _write(tmp / "noise.safetensors", bytes(range(256)) * 4),
    "a folder": lambda tmp: (tmp / "folder.safetensors").mkdir() or tmp / "folder.safetensors",
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path -> content hash (a folder: '<dir>')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(folder.rglob("*"))}


def _fails_cleanly(argv: list[str], capsys, names: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and names in err, err
    return err


@pytest.mark.parametrize("kind", sorted(WRONG_FILES))
def test_generate_lora_that_is_not_a_lora_file(kind: str, tiny_sd: Path, tmp_path: Path, capsys) -> None:
    lora = WRONG_FILES[kind](tmp_path)
    out = tmp_path / "out"
    _fails_cleanly(["generate", "--model", str(tiny_sd), "--lora", str(lora), "--prompt", "a dog", "--out", str(out)], capsys, str(lora))
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "binary", "a folder"])
def test_generate_prompts_file_that_is_not_text(kind: str, tiny_sd: Path, tmp_path: Path, capsys) -> None:
    prompts = WRONG_FILES[kind](tmp_path)
    _fails_cleanly(["generate", "--model", str(tiny_sd), "--prompts-file", str(prompts), "--out", str(tmp_path / "out")], capsys, str(prompts))


@pytest.mark.parametrize(("suffix", "content", "says"), [
    (".yaml", b"- a\n- b\n", "not a list"),
    (".toml", bytes(range(256)), "not a text file"),
    (".toml", b'schema_version = "two"\n', "schema_version"),
    (".toml", b"[train\nmax_steps = 1\n", "not valid TOML"),
    (".json", b"{}", "must end in .toml"),
])
def test_config_file_that_cannot_be_read(suffix: str, content: bytes, says: str, tmp_path: Path, capsys) -> None:
    config = _write(tmp_path / f"config{suffix}", content)
    err = _fails_cleanly(["train", "--config", str(config), "--instance-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")],
                         capsys, str(config))
    assert says in err and not (tmp_path / "run").exists()


def test_a_damaged_model_index_is_named(tiny_sd: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    model.mkdir()
    _write(model / "model_index.json", b'{"_class_name": "StableDiffusionPip')
    _fails_cleanly(["generate", "--model", str(model), "--prompt", "a dog", "--out", str(tmp_path / "out")], capsys,
                   str(model / "model_index.json"))


def test_generate_refuses_what_it_cannot_do_before_loading(tiny_sd: Path, tmp_path: Path, capsys) -> None:
    taken = _write(tmp_path / "taken.png", b"x")
    _fails_cleanly(["generate", "--model", str(tiny_sd), "--prompt", "a dog", "--out", str(taken)], capsys, "is a file")
    _fails_cleanly(["generate", "--model", str(tiny_sd), "--prompt", "a [V] dog", "--out", str(tmp_path / "o")], capsys, "[V]")
    _fails_cleanly(["generate", "--model", str(tiny_sd), "--prompt", "a dog", "--num-images", "0"], capsys, "num_images")
    _fails_cleanly(["generate", "--model", str(tiny_sd), "--prompt", "a dog", "--steps", "0"], capsys, "steps")
    assert not (tmp_path / "o").exists()


def test_an_unexpected_error_is_one_line_with_the_traceback_in_the_run_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    def broken(cfg):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(dreambooth.finetune, "finetune", broken)
    run = tmp_path / "run"
    assert main(["train", "--instance-dir", str(tmp_path), "--class-noun", "dog", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RuntimeError: CUDA error" in err and "--debug" in err
    (log,) = (run / "logs").glob("error-*.log")
    assert "Traceback" in log.read_text() and str(log) in err
    with pytest.raises(RuntimeError):
        main(["--debug", "train", "--instance-dir", str(tmp_path), "--class-noun", "dog", "--run-dir", str(run)])


def test_retraining_the_scorer_never_overwrites_the_shipped_one(tmp_path: Path, monkeypatch) -> None:
    import dreambooth.pocket.scorers as scorers

    written = []
    monkeypatch.setattr(scorers, "train_scorer", lambda out, seed, steps: written.append(Path(out)) or out)
    monkeypatch.chdir(tmp_path)
    assert main(["pocket", "train-scorer", "--steps", "1"]) == 0
    assert written and written[0].resolve() != scorers.WEIGHTS.resolve()


def test_eval_names_a_damaged_sample_before_any_scorer_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    from PIL import Image

    import dreambooth.eval.evaluate as evaluate

    from conftest import write_photos

    images = tmp_path / "samples"
    images.mkdir()
    (images / "prompts.txt").write_text("a sks cube on the beach\n")
    Image.new("RGB", (32, 32), "red").save(images / "000-0.png")
    whole = (images / "000-0.png").read_bytes()
    _write(images / "000-1.png", whole[: len(whole) // 2])
    monkeypatch.setattr(evaluate, "load_scorers", lambda *a, **k: pytest.fail("a scorer loaded before the inputs were checked"))
    argv = ["eval", "--images", str(images), "--identifier", "sks", "--class-noun", "cube", "--no-baseline",
            "--subject-dir", str(write_photos(tmp_path / "photos", n=2)), "--out", str(tmp_path / "eval")]
    _fails_cleanly(argv, capsys, str(images / "000-1.png"))
    assert not (tmp_path / "eval").exists()
