"""Failure-mode measures: colour space, thumbnails, colour pull, copies, the three checks and their
thresholds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth.cli import main
from dreambooth.eval import diagnostics
from dreambooth.eval.diagnostics import THUMBNAIL, Thresholds
from dreambooth.options import POCKET_CONTEXT_MARGIN
from dreambooth.pocket.subjects import SUBJECTS, Subject, photo_scenes, write_subject_photos
from dreambooth.pocket.world import CONTEXTS, Scene, render

GREY, RED = (128, 128, 128), (255, 0, 0)
SNOW = (235, 240, 248)  # about the mean colour of the pocket world's snow backdrop
POSES = [("centre", "upright", 0), ("left", "tilted", 1), ("right", "upright", 2), ("centre", "tilted", 3)]


def lab(rgb: tuple[int, int, int]) -> torch.Tensor:
    return diagnostics.rgb_to_lab(torch.tensor(rgb, dtype=torch.float32) / 255)


def test_rgb_to_lab_reference_values() -> None:
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = torch.tensor(
        [[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]]
    )
    torch.testing.assert_close(diagnostics.rgb_to_lab(rgb), expected, atol=0.02, rtol=0)


def test_thumbnails_read_the_centre_square_and_colours_their_regions() -> None:
    image = Image.new("RGB", (80, 64), (0, 0, 255))  # blue bands left and right are cropped away
    image.paste(GREY, (8, 0, 72, 64))
    image.paste(RED, (32, 24, 48, 40))  # the central 16 x 16 px: a quarter of the central square's cells
    thumbnails = diagnostics.lab_thumbnails([image])
    assert thumbnails.shape == (1, THUMBNAIL, THUMBNAIL, 3)
    torch.testing.assert_close(diagnostics.border_colour(thumbnails)[0], lab(GREY), atol=1e-3, rtol=0)
    torch.testing.assert_close(diagnostics.subject_colour(thumbnails)[0], lab(RED), atol=1e-3, rtol=0)


def _thumbnails(subject: tuple[int, int, int], background: tuple[int, int, int]) -> torch.Tensor:
    """One thumbnail: `subject` on the central square, `background` around it."""
    image = Image.new("RGB", (64, 64), background)
    image.paste(subject, (16, 16, 48, 48))
    return diagnostics.lab_thumbnails([image])


def test_colour_pull_measures_the_way_to_the_contexts_colour_only() -> None:
    # the context's colour is its border: snow
    photos, context = _thumbnails(RED, GREY), _thumbnails(GREY, SNOW)
    s, c = lab(RED), lab(SNOW)
    halfway = tuple(round((a + b) / 2) for a, b in zip(RED, SNOW))
    pull, gap = diagnostics.colour_pull(_thumbnails(halfway, SNOW), photos, context)
    assert gap == pytest.approx((c - s).norm().item(), rel=1e-4)
    assert pull == pytest.approx(1 - (lab(halfway) - c).norm().item() / gap, rel=1e-4) and 0.3 < pull < 0.7
    assert diagnostics.colour_pull(_thumbnails(RED, SNOW), photos, context)[0] == pytest.approx(0.0, abs=1e-4)
    assert diagnostics.colour_pull(_thumbnails(SNOW, SNOW), photos, context)[0] == pytest.approx(
        1.0, abs=1e-4
    )
    blue = _thumbnails((0, 0, 255), SNOW)
    assert diagnostics.colour_pull(blue, photos, context)[0] < 0  # blue is farther from snow than red is
    plain = _thumbnails(GREY, GREY)
    assert diagnostics.colour_pull(plain, plain, plain) == (0.0, 0.0)


def test_copy_similarity_finds_the_copied_photo() -> None:
    photos = torch.cat([_thumbnails(RED, GREY), _thumbnails(GREY, RED)])
    similarity, photo = diagnostics.copy_similarity(torch.cat([_thumbnails(GREY, SNOW), photos[1:]]), photos)
    assert (similarity, photo) == (pytest.approx(1.0), 1)
    similarity, _ = diagnostics.copy_similarity(_thumbnails(RED, SNOW), photos)
    assert 0 < similarity < 0.9


def _render(scenes: list[Scene]) -> torch.Tensor:
    return diagnostics.lab_thumbnails([Image.fromarray(image) for image in render(scenes)])


def _bled(subject: Subject, amount: float) -> Subject:
    def mix(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(round((1 - amount) * a + amount * b) for a, b in zip(rgb, SNOW))

    return replace(subject, colours=tuple(mix(c) for c in subject.colours), badge=mix(subject.badge))


@pytest.mark.parametrize("name", SUBJECTS)
def test_identity_loss_is_not_entanglement_and_colour_bleed_is(name: str) -> None:
    subject = SUBJECTS[name]
    photos = _render(photo_scenes(subject, 5))

    # what a pretrained model draws for "a <class> in the snow"
    def generic(pose: tuple[str, str, int]) -> Scene:
        position, view, variant = pose
        return Scene(subject.cls, "purple", "plain", subject.size, position, view, "snow", variant)

    pretrained = _render([generic(pose) for pose in POSES[:2]])

    def entangled(scenes: list[Scene]) -> diagnostics.Flag | None:
        return diagnostics.check_entanglement(
            *diagnostics.colour_pull(_render(scenes), photos, pretrained), Thresholds()
        )

    assert entangled([subject.scene("snow", *pose) for pose in POSES[2:]]) is None
    # the generic member's colour is not snow's
    assert entangled([generic(pose) for pose in POSES[2:]]) is None
    bled = [replace(subject.scene("snow", *pose), subject=_bled(subject, 0.75)) for pose in POSES[2:]]
    flag = entangled(bled)
    assert flag is not None and flag.kind == diagnostics.ENTANGLEMENT


def test_checks_fire_only_beyond_their_thresholds() -> None:
    t = Thresholds(
        context_margin=0.05, entanglement_pull=0.5, entanglement_min_gap=10, overfit_similarity=0.9
    )
    assert diagnostics.check_context(0.28, 0.30, t) is None
    assert diagnostics.check_context(0.20, 0.30, t).kind == diagnostics.CONTEXT_MISSING
    assert diagnostics.check_entanglement(0.8, 5.0, t) is None  # context colour too close to judge
    assert diagnostics.check_entanglement(0.4, 30.0, t) is None
    assert diagnostics.check_entanglement(0.8, 30.0, t).kind == diagnostics.ENTANGLEMENT
    assert diagnostics.check_overfitting(0.9, "00.jpg", t) is None
    flag = diagnostics.check_overfitting(0.97, "00.jpg", t)
    assert flag.kind == diagnostics.OVERFITTING and "00.jpg" in flag.evidence
    assert flag.explanation == diagnostics.EXPLANATIONS[diagnostics.OVERFITTING]


@pytest.mark.parametrize(
    "bad",
    [{"context_margin": -0.1}, {"entanglement_pull": 0.0}, {"entanglement_min_gap": -1.0},
     {"overfit_similarity": 1.5}],
)
def test_thresholds_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Thresholds(**bad)


@pytest.fixture(scope="module")
def copied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pocket photos of a subject, and samples whose one prompt's image is photo 0 itself."""
    root = tmp_path_factory.mktemp("copied")
    subject = SUBJECTS["checker_cube"]
    photos = write_subject_photos(subject, root / "photos", n=3)
    samples = root / "samples"
    samples.mkdir()
    context = photo_scenes(subject, 3)[0].context
    (samples / "prompts.txt").write_text(f"a sks cube {CONTEXTS[context]}\na cube\n")
    Image.open(photos[0]).save(samples / "000-0.png")
    prior = render([Scene("cube", "red", "plain", "large", "centre", "upright", "grass")])[0]
    Image.fromarray(prior).save(samples / "001-0.png")
    return {"photos": root / "photos", "samples": samples, "root": root}


def _overfitting_flags(copied: dict[str, Path], name: str, *extra: str) -> tuple[list[str], dict]:
    """`dreambooth eval` of the copied samples with the pocket scorers: the flags' kinds, and the thresholds
    used."""
    out = copied["root"] / name
    argv = [
        "eval", "pocket", "--images", str(copied["samples"]), "--identifier", "sks", "--class-noun", "cube",
        "--subject-dir", str(copied["photos"]), "--no-baseline", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "metrics.json").read_text())
    return [f["kind"] for p in data["subjects"][0]["prompts"] for f in p["flags"]], data["thresholds"]


def test_eval_thresholds_come_from_the_flags_and_the_config_file(copied: dict[str, Path]) -> None:
    kinds, used = _overfitting_flags(copied, "defaults")
    # the margin calibrated for the pocket scorers
    pocket = {**vars(Thresholds()), "context_margin": POCKET_CONTEXT_MARGIN}
    assert kinds == [diagnostics.OVERFITTING] and used == pocket
    flags = ["--overfit-similarity", "1.0", "--thresholds.context_margin", "0.1"]
    kinds, used = _overfitting_flags(copied, "flag", *flags)
    assert kinds == [] and used == {**pocket, "overfit_similarity": 1.0, "context_margin": 0.1}
    config = copied["root"] / "eval.toml"
    config.write_text("[thresholds]\noverfit_similarity = 1.0\nentanglement_pull = 0.9\n")
    kinds, used = _overfitting_flags(copied, "file", "--config", str(config))
    assert kinds == [] and used == {**pocket, "overfit_similarity": 1.0, "entanglement_pull": 0.9}


def test_the_context_margin_follows_the_scorer_unless_set() -> None:
    from dreambooth.options import PAPER_CONTEXT_MARGIN

    assert Thresholds().for_scorers(paper=True).context_margin == PAPER_CONTEXT_MARGIN
    assert Thresholds().for_scorers(paper=False).context_margin == POCKET_CONTEXT_MARGIN
    assert Thresholds(context_margin=0.2).for_scorers(paper=True).context_margin == 0.2
