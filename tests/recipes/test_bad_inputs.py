"""Every input a user can get wrong gets a clear error (or warning) that names it, before any training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dreambooth.cli import main

from conftest import write_photos

FAST = ["--class-noun", "dog", "--max-steps", "1", "--no-prior-preservation", "--validation-every", "0",
        "--validation-images", "1", "--validation-steps", "1", "--logger", "none"]


def run(tmp_path: Path, model, instance_dir, *extra) -> int:
    return main([
        "train", "--model", str(model), "--instance-dir", str(instance_dir), "--run-dir",
        str(tmp_path / "run"), *FAST, *extra,
    ])


@pytest.mark.parametrize(
    ("make_folder", "message"),
    [
        (lambda tmp: tmp / "nowhere", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "0 images"),
        (lambda tmp: (tmp / "a.jpg").write_text("x") and tmp / "a.jpg", "is a file"),
    ],
    ids=["missing", "empty", "file"],
)
def test_bad_instance_dir(tiny_sd: Path, tmp_path: Path, make_folder, message: str, capsys) -> None:
    assert run(tmp_path, tiny_sd, make_folder(tmp_path)) == 2
    assert message in capsys.readouterr().err


def test_non_image_files_are_named_and_skipped_or_refused(
    tiny_sd: Path, tmp_path: Path, caplog, capsys
) -> None:
    photos = write_photos(tmp_path / "photos", n=3)
    (photos / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, tiny_sd, photos) == 0
    assert "notes.pdf" in caplog.text and "broken.jpg" in caplog.text
    assert run(tmp_path, tiny_sd, photos, "--on-bad-file", "error", "--overwrite") == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_small_images_warn(tiny_sd: Path, tmp_path: Path, caplog) -> None:
    photos = write_photos(tmp_path / "photos", n=3, size=(12, 12))
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, tiny_sd, photos) == 0
    assert "photo_0.png" in caplog.text and "upscaled" in caplog.text.lower()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("./no/such/model", "model path './no/such/model' does not exist"),
        ("EMPTY_DIR", "is not a diffusers model: it has no model_index.json"),
        ("CKPT", "pickle checkpoint"),
        ("TEXT", "is a file but not a checkpoint"),
    ],
)
def test_bad_model_source(tmp_path: Path, photos: Path, model: str, message: str, capsys) -> None:
    if model == "EMPTY_DIR":
        model = str(tmp_path / "not-a-model")
        Path(model).mkdir()
    elif model == "CKPT":
        model = str(tmp_path / "model.ckpt")
        Path(model).write_bytes(b"")
    elif model == "TEXT":
        model = str(tmp_path / "model.txt")
        Path(model).write_text("")
    assert run(tmp_path, model, photos) == 2
    assert message in capsys.readouterr().err


def test_identifier_the_tokenizer_splits_warns(tiny_sd: Path, photos: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, tiny_sd, photos, "--identifier", "zqxv") == 0
    assert "zqxv" in caplog.text and "tokens" in caplog.text


def test_sks_warns_that_it_is_a_rifle(tiny_sd: Path, photos: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, tiny_sd, photos, "--identifier", "sks") == 0
    assert "rifle" in caplog.text


def test_a_class_the_pocket_model_never_saw_warns(photos: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, "pocket", photos) == 0  # FAST's --class-noun dog
    assert "'dog'" in caplog.text and "only knows ball, cube" in caplog.text


def test_unwritable_run_folder(tiny_sd: Path, photos: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should go")
    assert (
        main([
            "train", "--model", str(tiny_sd), "--instance-dir", str(photos), "--run-dir",
            str(blocker / "run"), *FAST,
        ])
        == 2
    )
    assert "cannot write to run folder" in capsys.readouterr().err


def test_config_file_with_an_unknown_key(tiny_sd: Path, photos: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[prior]\nnum_class_image = 10\n")
    assert run(tmp_path, tiny_sd, photos, "--config", str(config)) == 2
    assert "did you mean 'prior.num_class_images'" in capsys.readouterr().err


def test_fp16_on_cpu_is_refused_with_the_alternative(
    tiny_sd: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    assert run(tmp_path, tiny_sd, photos, "--mixed-precision", "fp16") == 2
    assert "on CPU use 'no' (fp32)" in capsys.readouterr().err


def test_missing_class_noun_is_reported_with_the_flag(
    tiny_sd: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    assert (
        main([
            "train", "--model", str(tiny_sd), "--instance-dir", str(photos), "--run-dir", str(tmp_path / "r"),
        ])
        == 2
    )
    assert "--class-noun" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--subject", "nosuch"], "ready ones: checker_cube"),
     (["--base-steps", "0"], "--base-steps must be >= 1"),
     (["--num-photos", "12"], "--num-photos must be 1-8")],
    ids=["subject", "steps", "photos"],
)
def test_bad_demo_flags_are_named(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["demo", "--run-dir", str(tmp_path / "demo"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
