"""`dreambooth eval` through the real CLI on a tiny Stable Diffusion, with tiny random DINO and CLIP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dreambooth.cli import main
from dreambooth.eval.scoring import REAL_LABEL

from conftest import write_photos
from tiny_models import build_tiny_sd, tiny_scorer_flags

FAST = ["--max-prompts", "2", "--num-images", "2", "--steps", "2", "--device", "cpu"]
IDENTIFIER = "xon"


@pytest.fixture(scope="module")
def setup(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run folder (fine-tuned pipeline + run.json naming tiny_sd as its base), photos, scorer flags."""
    root = tmp_path_factory.mktemp("eval")
    run = root / "run"
    build_tiny_sd(run / "pipeline", seed=1)
    info = {
        "identifier": IDENTIFIER, "class_noun": "dog", "model": {"source": str(tiny_sd)}, "status": "done",
    }
    (run / "run.json").write_text(json.dumps(info))
    return {
        "run": run, "base": tiny_sd, "photos": write_photos(root / "photos", n=3),
        "scorers": tiny_scorer_flags(root),
    }


@pytest.fixture(scope="module")
def evaluated(setup: dict) -> Path:
    """The output folder of `dreambooth eval RUN` (its default: RUN/eval)."""
    assert (
        main(["eval", str(setup["run"]), "--subject-dir", str(setup["photos"]), *setup["scorers"], *FAST])
        == 0
    )
    return setup["run"] / "eval"


def test_eval_of_a_run_writes_table_1_prompts_and_a_self_contained_report(evaluated: Path) -> None:
    data = json.loads((evaluated / "metrics.json").read_text())
    real, pretrained, finetuned = data["table"]
    assert [real["label"], pretrained["label"], finetuned["label"]] == [
        REAL_LABEL, "Pretrained", "DreamBooth",
    ]
    assert -1 <= real["dino"] <= 1 and -1 <= real["clip_i"] <= 1 and real["clip_t"] is None
    for row in (pretrained, finetuned):
        assert all(-1 <= row[key] <= 1 for key in ("dino", "clip_i", "clip_t", "pres")), row
        assert row["div"] >= 0 and row["class_div"] >= 0
    prompts = data["subjects"][0]["prompts"]
    assert [(p["model"], p["n_images"]) for p in prompts] == [("Pretrained", 2)] * 2 + [("DreamBooth", 2)] * 2
    assert all(IDENTIFIER in p["prompt"] and IDENTIFIER not in p["text"] for p in prompts[2:])
    assert set(prompts[2]["checked"]) == {"overfitting", "context_missing", "entanglement"}

    html = (evaluated / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 3 + 2 * (2 * 2 + 2)  # photos; per model 2 prompts x 2 images and 2 prior samples
    assert all((evaluated / src).is_file() for src in sources)

    record = json.loads((evaluated / "eval.json").read_text())
    assert record["identifier"] == IDENTIFIER and record["sampling"]["num_images"] == 2


def test_both_models_get_matching_prompts_in_the_generate_layout(setup: dict, evaluated: Path) -> None:
    finetuned = (evaluated / "samples" / "finetuned" / "prompts.txt").read_text().splitlines()
    pretrained = (evaluated / "samples" / "pretrained" / "prompts.txt").read_text().splitlines()
    assert finetuned == [f"a {IDENTIFIER} dog in the jungle", f"a {IDENTIFIER} dog in the snow", "a dog"]
    assert pretrained == ["a dog in the jungle", "a dog in the snow", "a dog"]
    names = sorted(p.name for p in (evaluated / "samples" / "pretrained").glob("*-*.png"))
    assert names == ["000-0.png", "000-1.png", "001-0.png", "001-1.png", "002-0.png", "002-1.png"]
    record = json.loads((evaluated / "eval.json").read_text())
    assert record["sampling"]["seed"] == 0 and record["pretrained"]["model"] == str(setup["base"])


def test_scoring_existing_folders_reproduces_the_generated_scores(
    setup: dict, evaluated: Path, tmp_path: Path
) -> None:
    samples = evaluated / "samples"
    argv = [
        "eval", "--images", str(samples / "finetuned"), "--baseline-images", str(samples / "pretrained"),
        "--identifier", IDENTIFIER, "--class-noun", "dog", "--subject-dir", str(setup["photos"]),
        "--out", str(tmp_path), *setup["scorers"],
    ]  # fmt: skip
    assert main(argv) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())["table"]
    first = json.loads((evaluated / "metrics.json").read_text())["table"]
    assert again == [
        {k: pytest.approx(v) if isinstance(v, float) else v for k, v in row.items()} for row in first
    ]


def _bad_inputs(setup: dict, evaluated: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (argv after `eval`, part of the error message)."""
    run, photos, base = str(setup["run"]), str(setup["photos"]), str(setup["base"])
    (tmp_path / "no-photos").mkdir()
    (tmp_path / "no-photos" / "notes.txt").write_text("not a photo")
    (tmp_path / "no-prompts").mkdir()
    (tmp_path / "missing-images").mkdir()
    (tmp_path / "missing-images" / "prompts.txt").write_text("a xon dog\na dog\n")
    return {
        "missing subject dir": ([run, "--subject-dir", str(tmp_path / "nope")], "does not exist"),
        "subject dir without photos": (
            [run, "--subject-dir", str(tmp_path / "no-photos")], "has 0 images; found: notes.txt",
        ),
        "nothing to evaluate": (["--subject-dir", photos], "nothing to evaluate"),
        "no class noun": (
            [base, "--subject-dir", photos], "is not a run folder (no run.json); pass --class-noun",
        ),
        "no identifier": ([base, "--subject-dir", photos, "--class-noun", "dog"], "pass --identifier"),
        "missing baseline": (
            [run, "--subject-dir", photos, "--baseline", str(tmp_path / "gone")], "baseline: model path",
        ),
        "images without prompts.txt": (
            [
                "--images", str(tmp_path / "no-prompts"), "--identifier", "xon", "--class-noun", "dog",
                "--subject-dir", photos,
            ],
            "has no prompts.txt",
        ),
        "prompt without images": (
            [
                "--images", str(tmp_path / "missing-images"), "--identifier", "xon", "--class-noun", "dog",
                "--subject-dir", photos,
            ],
            "prompt 0 ('a xon dog') has no images",
        ),
        "identifier not in prompts": (
            [
                "--images", str(evaluated / "samples" / "pretrained"), "--identifier", "xon", "--class-noun",
                "dog", "--subject-dir", photos,
            ],
            "in none of the prompts",
        ),
        "missing scorer": (
            [run, "--subject-dir", photos, "--eval-dino", str(tmp_path / "dino")],
            "Offline, pass a local folder instead (--eval.dino",
        ),
    }


BAD = [
    "missing subject dir", "subject dir without photos", "nothing to evaluate", "no class noun",
    "no identifier", "missing baseline", "images without prompts.txt", "prompt without images",
    "identifier not in prompts", "missing scorer",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_fail_with_a_clear_message_before_sampling(
    case: str, setup: dict, evaluated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, message = _bad_inputs(setup, evaluated, tmp_path)[case]
    assert main(["eval", *argv, *FAST, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # failed before writing anything
