"""`dreambooth dreambench` on a two-subject dataset: trains, evaluates, summarises, and resumes per
subject."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dreambooth.cli import main
from dreambooth.dreambench import find_subjects, read_class_nouns
from dreambooth.eval.scoring import REAL_LABEL

from conftest import write_photos
from tiny_models import tiny_scorer_flags

CLASSES = "Classes\n\nsubject_name,class\nalpha,dog\nbeta,stuffed animal\n\nPrompts\n\nObject Prompts\n"
CONFIG = """\
[prior]
num_class_images = 2
steps = 2
batch_size = 2

[lora]
rank = 4

[train]
max_steps = 2

[validation]
every_n_steps = 0
num_images = 1
steps = 2
validation_prompts = ["a {identifier} {class_noun}"]

[checkpoint]
every_n_steps = 0

[output]
logger = "none"
save_pipeline = false  # evaluated as the base model plus the run's LoRA
"""
FAST_EVAL = ["--max-prompts", "1", "--bench-num-images", "2", "--bench-steps", "2", "--bench-device", "cpu"]


def _dataset(root: Path) -> Path:
    for seed, name in enumerate(("alpha", "beta")):
        write_photos(root / name, n=3, seed=seed)
    (root / "prompts_and_classes.txt").write_text(CLASSES)
    return root


def _mtimes(out: Path) -> dict[str, float]:
    files = ["run.json", "lora/pytorch_lora_weights.safetensors", "eval/eval.json"]
    return {f"{s}/{f}": (out / "runs" / s / f).stat().st_mtime_ns for s in ("alpha", "beta") for f in files}


def test_dreambench_trains_scores_summarises_and_skips_finished_subjects(
    tiny_sd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, out = _dataset(tmp_path / "data"), tmp_path / "bench"
    (tmp_path / "run.toml").write_text(CONFIG)
    argv = ["dreambench", str(data), "--config", str(tmp_path / "run.toml"), "--model", str(tiny_sd),
            "--out", str(out), *tiny_scorer_flags(tmp_path), *FAST_EVAL]  # fmt: skip
    assert main(argv) == 0

    summary = json.loads((out / "metrics.json").read_text())
    assert [s["name"] for s in summary["subjects"]] == ["alpha", "beta"]
    assert [s["class_noun"] for s in summary["subjects"]] == ["dog", "stuffed animal"]
    assert [row["label"] for row in summary["table"]] == [REAL_LABEL, "Pretrained", "DreamBooth"]
    finetuned = summary["table"][2]
    assert all(-1 <= finetuned[key] <= 1 for key in ("dino", "clip_i", "clip_t", "pres"))
    for subject in summary["subjects"]:
        assert subject["prompts"][-1]["prompt"].startswith("a ") and subject["prompts"][-1]["n_images"] == 2
    assert (out / "report.html").is_file()
    for name in ("alpha", "beta"):
        run = json.loads((out / "runs" / name / "run.json").read_text())
        assert run["status"] == "done" and (out / "runs" / name / "class_images" / "manifest.json").is_file()
        record = json.loads((out / "runs" / name / "eval" / "eval.json").read_text())
        # The run folder (a LoRA run without a merged pipeline: its base model + lora/), beside its base
        # model.
        assert record["finetuned"]["model"] == str(out / "runs" / name) and record["pretrained"][
            "model"
        ] == str(tiny_sd)
    before = _mtimes(out)

    caplog.set_level(logging.INFO, logger="dreambooth")
    assert main(argv) == 0
    assert _mtimes(out) == before  # neither retrained nor resampled
    assert sum("trained and scored; skipping" in r.getMessage() for r in caplog.records) == 2
    assert json.loads((out / "metrics.json").read_text())["table"] == summary["table"]

    # An interrupted run (status "training", no evaluation) resumes through the trainer, then is scored.
    info = json.loads((out / "runs" / "beta" / "run.json").read_text())
    (out / "runs" / "beta" / "run.json").write_text(json.dumps({**info, "status": "training"}))
    (out / "runs" / "beta" / "eval" / "eval.json").unlink()
    caplog.clear()
    assert main(argv) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "alpha: trained and scored; skipping" in " ".join(messages) and "beta: resuming training" in messages
    )
    assert json.loads((out / "runs" / "beta" / "run.json").read_text())["identifier"] == info["identifier"]
    assert (out / "runs" / "beta" / "eval" / "eval.json").is_file()


def test_class_nouns_come_from_prompts_and_classes_txt_else_from_dreambench(tmp_path: Path) -> None:
    data = _dataset(tmp_path)
    assert read_class_nouns(data / "prompts_and_classes.txt") == {"alpha": "dog", "beta": "stuffed animal"}
    assert [(s.name, s.class_noun) for s in find_subjects(data, ["beta"])] == [("beta", "stuffed animal")]
    (data / "prompts_and_classes.txt").unlink()
    write_photos(data / "red_cartoon", n=3)
    with pytest.raises(ValueError, match="no class noun for subject.*alpha, beta"):
        find_subjects(data)
    assert [s.class_noun for s in find_subjects(data, ["red_cartoon"])] == ["cartoon"]
    with pytest.raises(ValueError, match="no subject 'gamma'"):
        find_subjects(data, ["gamma"])


def test_bad_dataset_fails_before_training(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _dataset(tmp_path / "data")
    (data / "beta" / "photo_0.png").write_text("not a png")
    for photo in (data / "beta").glob("photo_[12].png"):
        photo.unlink()
    assert main(["dreambench", str(data), "--model", str(tiny_sd), "--out", str(tmp_path / "out")]) == 2
    assert "has 0 images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
