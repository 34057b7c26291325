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

from conftest import write_photos

WRONG_FILES: dict[str, Callable[[Path], Path]] = {
    "missing": lambda tmp: tmp / "nowhere.safetensors",
    "empty": lambda tmp: _write(tmp / "empty.safetensors", b""),
    "truncated": lambda tmp: _write(
        tmp / "cut.safetensors", b'\x40\x00\x00\x00\x00\x00\x00\x00{"a": {"dtype"'
    ),
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
    _fails_cleanly(
        ["generate", "--model", str(tiny_sd), "--lora", str(lora), "--prompt", "a dog", "--out", str(out)],
        capsys, str(lora),
    )
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "binary", "a folder"])
def test_generate_prompts_file_that_is_not_text(kind: str, tiny_sd: Path, tmp_path: Path, capsys) -> None:
    prompts = WRONG_FILES[kind](tmp_path)
    _fails_cleanly(
        ["generate", "--model", str(tiny_sd), "--prompts-file", str(prompts), "--out", str(tmp_path / "out")],
        capsys, str(prompts),
    )


@pytest.mark.parametrize(("suffix", "content", "says"), [
    (".yaml", b"- a\n- b\n", "not a list"),
    (".toml", bytes(range(256)), "not a text file"),
    (".toml", b'schema_version = "two"\n', "schema_version"),
    (".toml", b"[train\nmax_steps = 1\n", "not valid TOML"),
    (".json", b"{}", "must end in .toml"),
])
def test_config_file_that_cannot_be_read(
    suffix: str, content: bytes, says: str, tmp_path: Path, capsys
) -> None:
    config = _write(tmp_path / f"config{suffix}", content)
    err = _fails_cleanly(
        [
            "train", "--config", str(config), "--instance-dir", str(tmp_path), "--run-dir",
            str(tmp_path / "run"),
        ],
        capsys, str(config),
    )
    assert says in err and not (tmp_path / "run").exists()


def test_a_damaged_model_index_is_named(tiny_sd: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    model.mkdir()
    _write(model / "model_index.json", b'{"_class_name": "StableDiffusionPip')
    _fails_cleanly(
        ["generate", "--model", str(model), "--prompt", "a dog", "--out", str(tmp_path / "out")], capsys,
        str(model / "model_index.json"),
    )


def test_generate_refuses_what_it_cannot_do_before_loading(tiny_sd: Path, tmp_path: Path, capsys) -> None:
    taken = _write(tmp_path / "taken.png", b"x")
    _fails_cleanly(
        ["generate", "--model", str(tiny_sd), "--prompt", "a dog", "--out", str(taken)], capsys, "is a file"
    )
    _fails_cleanly(
        ["generate", "--model", str(tiny_sd), "--prompt", "a [V] dog", "--out", str(tmp_path / "o")], capsys,
        "[V]",
    )
    _fails_cleanly(
        ["generate", "--model", str(tiny_sd), "--prompt", "a dog", "--num-images", "0"], capsys, "num_images"
    )
    _fails_cleanly(
        ["generate", "--model", str(tiny_sd), "--prompt", "a dog", "--steps", "0"], capsys, "steps"
    )
    assert not (tmp_path / "o").exists()


def test_an_unexpected_error_is_one_line_with_the_traceback_in_the_run_folder(
    tmp_path: Path, capsys, monkeypatch
) -> None:
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
        main([
            "--debug", "train", "--instance-dir", str(tmp_path), "--class-noun", "dog", "--run-dir", str(run),
        ])


def test_ctrl_c_outside_training_is_one_line_not_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    def making_class_images(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(dreambooth.finetune, "finetune", making_class_images)
    argv = ["train", "--instance-dir", str(tmp_path), "--class-noun", "dog", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped: interrupted" in err and "same command again" in err
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", *argv])


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
    monkeypatch.setattr(
        evaluate, "load_scorers",
        lambda *a, **k: pytest.fail("a scorer loaded before the inputs were checked"),
    )
    argv = ["eval", "--images", str(images), "--identifier", "sks", "--class-noun", "cube", "--no-baseline",
            "--subject-dir", str(write_photos(tmp_path / "photos", n=2)), "--out", str(tmp_path / "eval")]
    _fails_cleanly(argv, capsys, str(images / "000-1.png"))
    assert not (tmp_path / "eval").exists()


TRAIN = ["--class-noun", "dog", "--max-steps", "1", "--num-class-images", "2", "--class-steps", "1",
         "--validation-every", "0", "--validation-images", "1", "--validation-steps", "1", "--logger", "none"]


@pytest.mark.parametrize("wrong", ["another LoRA rank", "every checkpoint damaged"])
def test_a_resume_that_fails_leaves_the_run_folder_as_it_was(
    wrong: str, tiny_sd: Path, tmp_path: Path, capsys
) -> None:
    photos = write_photos(tmp_path / "photos", n=2)
    argv = [
        "train", "--model", str(tiny_sd), "--instance-dir", str(photos), "--run-dir", str(tmp_path / "run"),
        *TRAIN, "--lora-rank", "4",
    ]
    assert main(argv) == 0
    if wrong == "every checkpoint damaged":
        for weights in (tmp_path / "run").rglob("trainable.safetensors"):
            weights.write_bytes(weights.read_bytes()[:100])
    before = _snapshot(tmp_path / "run")
    extra = ["--lora-rank", "8"] if wrong == "another LoRA rank" else []
    says = "another shape" if wrong == "another LoRA rank" else "no intact checkpoint"
    _fails_cleanly([*argv, "--max-steps", "2", "--resume", *extra], capsys, says)
    assert _snapshot(tmp_path / "run") == before


def test_the_same_model_named_by_another_path_keeps_its_class_images(
    tiny_sd: Path, tmp_path: Path, monkeypatch
) -> None:
    photos = write_photos(tmp_path / "photos", n=2)
    monkeypatch.chdir(tiny_sd.parent)
    argv = ["train", "--instance-dir", str(photos), "--run-dir", str(tmp_path / "run"), *TRAIN]
    assert main([argv[0], "--model", tiny_sd.name, *argv[1:]]) == 0
    class_images = _snapshot(tmp_path / "run" / "class_images")
    assert main([argv[0], "--model", str(tiny_sd.resolve()), *argv[1:], "--max-steps", "2", "--resume"]) == 0
    # accepted as the same model, not regenerated
    assert _snapshot(tmp_path / "run" / "class_images") == class_images


@pytest.mark.parametrize("kind", [*sorted(WRONG_FILES), "another pickle"])
def test_eval_names_lpips_weights_of_the_wrong_kind_before_any_scorer_loads(
    kind: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    import pickle

    import numpy as np
    from PIL import Image

    import dreambooth.eval.evaluate as evaluate

    weights = (
        _write(tmp_path / "other.ckpt", pickle.dumps({"AlexNet_0": np.zeros(3)})) if kind == "another pickle"
        else WRONG_FILES[kind](tmp_path)
    )
    monkeypatch.setattr(
        evaluate, "load_scorers",
        lambda *a, **k: pytest.fail("a scorer loaded before the inputs were checked"),
    )
    images = tmp_path / "samples"
    images.mkdir()
    (images / "prompts.txt").write_text("a sks cube on the beach\n")
    Image.new("RGB", (32, 32), "red").save(images / "000-0.png")
    argv = [
        "eval", "--images", str(images), "--identifier", "sks", "--class-noun", "cube", "--no-baseline",
        "--lpips-weights", str(weights), "--subject-dir", str(write_photos(tmp_path / "photos", n=2)),
        "--out", str(tmp_path / "eval"),
    ]
    _fails_cleanly(argv, capsys, str(weights))
    assert not (tmp_path / "eval").exists()


def _file_arguments(tiny_sd: Path, photos: Path, tmp: Path) -> dict[str, Callable[[str], list[str]]]:
    """Each command's file and folder arguments, as argv with the argument under test set to `wrong`."""
    train = [
        "train", "--model", str(tiny_sd), "--instance-dir", str(photos), "--class-noun", "dog", "--max-steps",
        "1",
    ]
    return {
        "train --model": lambda wrong: [
            "train", "--model", wrong, "--instance-dir", str(photos), "--class-noun", "dog",
        ],
        "train --instance-dir": lambda wrong: [
            "train", "--model", str(tiny_sd), "--instance-dir", wrong, "--class-noun", "dog",
        ],
        "train --class-dir": lambda wrong: [*train, "--class-dir", wrong, "--run-dir", str(tmp / "run")],
        "train --run-dir": lambda wrong: [*train, "--run-dir", wrong],
        "generate --model": lambda wrong: [
            "generate", "--model", wrong, "--prompt", "a dog", "--out", str(tmp / "out"),
        ],
        "generate --out": lambda wrong: [
            "generate", "--model", str(tiny_sd), "--prompt", "a dog", "--out", wrong,
        ],
        "eval --images": lambda wrong: [
            "eval", "--images", wrong, "--subject-dir", str(photos), "--identifier", "sks", "--class-noun",
            "dog", "--no-baseline", "--out", str(tmp / "out"),
        ],
        "eval --subject-dir": lambda wrong: [
            "eval", str(tiny_sd), "--subject-dir", wrong, "--identifier", "sks", "--class-noun", "dog",
            "--no-baseline", "--out", str(tmp / "out"),
        ],
        "export RUN": lambda wrong: [
            "export", wrong, "--format", "lora-kohya", "--out", str(tmp / "out.safetensors"),
        ],
        "dreambench DATASET": lambda wrong: [
            "dreambench", wrong, "--model", str(tiny_sd), "--out", str(tmp / "out"),
        ],
    }


# What an argument accepts as valid: an output folder that is missing (it is created) or empty.
ACCEPTED = {
    (argument, kind) for argument in ("train --class-dir", "train --run-dir", "generate --out")
    for kind in ("missing", "a folder")
}


@pytest.mark.parametrize("kind", sorted(WRONG_FILES))
def test_every_file_argument_names_a_wrong_file_before_any_model_loads(
    kind: str, tiny_sd: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import dreambooth.models.loading as loading

    photos = write_photos(tmp_path / "photos", n=3)
    monkeypatch.setattr(
        loading, "load_stages", lambda *a, **k: pytest.fail("a model loaded before the inputs were checked")
    )
    for argument, argv in _file_arguments(tiny_sd, photos, tmp_path).items():
        if (argument, kind) in ACCEPTED:
            continue
        folder = tmp_path / argument.replace(" ", "_").replace("-", "")
        folder.mkdir()
        wrong = WRONG_FILES[kind](folder)
        before = _snapshot(tmp_path)
        assert main(argv(str(wrong))) == 2, argument
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(wrong) in err, f"{argument} given {kind}: {err}"
        assert _snapshot(tmp_path) == before, f"{argument} given {kind} changed files"


def test_a_first_start_that_fails_records_no_run_and_the_next_start_needs_no_flag(
    tiny_sd: Path, tmp_path: Path, capsys
) -> None:
    from PIL import Image

    photos, foreign = write_photos(tmp_path / "photos", n=2), tmp_path / "foreign"
    foreign.mkdir()
    # class images of unknown origin: refused after the model loads
    Image.new("RGB", (32, 32)).save(foreign / "dog.png")
    argv = [
        "train", "--model", str(tiny_sd), "--instance-dir", str(photos), "--run-dir", str(tmp_path / "run"),
        *TRAIN,
    ]
    _fails_cleanly([*argv, "--class-dir", str(foreign)], capsys, str(foreign))
    assert not (tmp_path / "run").exists()  # the folder it made is gone again: nothing was written in it
    assert main(argv) == 0  # not "already exists: pass --resume or --overwrite"
