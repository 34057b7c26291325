"""Checkpoints: atomic, pruned, never half-written as latest; they restore exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dreambooth.training.state import (
    LATEST_FILE,
    OPTIMIZER_FILE,
    PROGRESS_FILE,
    TRAINABLE_FILE,
    CheckpointWriter,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)


def _modules(seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    unet = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    unet[1].requires_grad_(False)  # frozen parameters are not checkpointed
    return {"unet": unet}


def test_save_then_load_restores_trainable_weights_and_state(tmp_path: Path) -> None:
    saved = _modules(0)
    save_checkpoint(tmp_path, 5, saved, {"optimizer": {"x": 1}}, {"loss": 0.5}, keep_last=2)
    restored = _modules(1)
    step, state = load_checkpoint(latest_checkpoint(tmp_path), restored)
    assert step == 5 and state == {"optimizer": {"x": 1}}
    assert torch.equal(restored["unet"][0].weight, saved["unet"][0].weight)
    assert not torch.equal(restored["unet"][1].weight, saved["unet"][1].weight)  # frozen: untouched


def test_a_background_checkpoint_holds_the_values_of_its_step(tmp_path: Path, monkeypatch) -> None:
    import dreambooth.training.state as state

    modules, moments = _modules(0), {"exp_avg": torch.ones(3)}
    at_save = modules["unet"][0].weight.detach().clone()
    release = __import__("threading").Event()
    write = state._write_checkpoint
    monkeypatch.setattr(state, "_write_checkpoint", lambda *a: release.wait(10) and write(*a))
    writer, plotted = CheckpointWriter(), []
    writer.save(tmp_path, 3, modules, {"optimizer": moments}, {}, keep_last=2, then=lambda: plotted.append(3))
    with torch.no_grad():  # training goes on while the files are written
        modules["unet"][0].weight.add_(1.0)
        moments["exp_avg"].add_(1.0)
    assert latest_checkpoint(tmp_path) is None
    release.set()
    writer.close()
    restored = _modules(1)
    step, saved = load_checkpoint(latest_checkpoint(tmp_path), restored)
    assert step == 3 and plotted == [3] and torch.equal(restored["unet"][0].weight, at_save)
    assert torch.equal(saved["optimizer"]["exp_avg"], torch.ones(3))


def test_a_failed_background_write_is_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = CheckpointWriter()
    writer.save(blocker, 1, _modules(0), {}, {}, keep_last=1)
    with pytest.raises(OSError):
        writer.close()


def test_only_the_last_k_are_kept_and_latest_points_at_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _modules(step), {}, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003", "step-000004"]
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step-000004"


def test_a_half_written_checkpoint_is_never_latest(tmp_path: Path) -> None:
    """A process killed while writing leaves a temporary folder or a folder without progress.json."""
    save_checkpoint(tmp_path, 1, _modules(1), {}, {}, keep_last=3)
    (tmp_path / ".tmp-step-000002").mkdir()                 # killed before the rename
    (tmp_path / "step-000003").mkdir()                      # a folder without its completion marker
    (tmp_path / LATEST_FILE).write_text("step-000003\n")    # even if latest were pointed at it
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not (tmp_path / "step-000001" / PROGRESS_FILE).read_text() == ""


def test_a_checkpoint_of_another_model_is_refused_with_advice(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _modules(0), {}, {}, keep_last=1)
    other = {"unet": nn.Linear(3, 3)}
    with pytest.raises(ValueError, match="does not match this model's trainable parameters"):
        load_checkpoint(latest_checkpoint(tmp_path), other)


def test_no_checkpoint_means_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("damage", ["truncated weights", "empty optimizer", "garbled progress"])
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(
    tmp_path: Path, damage: str, caplog
) -> None:
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _modules(step), {"optimizer": {"step": step}}, {}, keep_last=3)
    newest = tmp_path / "step-000002"
    if damage == "truncated weights":
        weights = newest / TRAINABLE_FILE
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "empty optimizer":
        (newest / OPTIMIZER_FILE).write_bytes(b"")
    else:
        (newest / PROGRESS_FILE).write_text('{"step": ')
    restored = _modules(9)
    before = restored["unet"][0].weight.clone()
    with caplog.at_level("WARNING"):
        path, step, state = load_latest(tmp_path, restored)
    assert (path.name, step, state) == ("step-000001", 1, {"optimizer": {"step": 1}})
    assert torch.equal(restored["unet"][0].weight, _modules(1)["unet"][0].weight) and not torch.equal(
        before, _modules(1)["unet"][0].weight
    )
    assert "step-000002" in caplog.text and "skipping" in caplog.text


def test_when_every_checkpoint_is_damaged_resume_says_so_and_changes_nothing(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _modules(1), {}, {}, keep_last=1)
    (tmp_path / "step-000001" / OPTIMIZER_FILE).write_bytes(b"\x00" * 10)
    restored = _modules(9)
    before = restored["unet"][0].weight.clone()
    with pytest.raises(ValueError, match=r"no intact checkpoint .*optimizer.pt' is unreadable.*--overwrite"):
        load_latest(tmp_path, restored)
    assert torch.equal(restored["unet"][0].weight, before)


def test_a_checkpoint_of_another_shape_names_the_tensor(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _modules(0), {}, {}, keep_last=1)
    torch.manual_seed(0)
    wider = {"unet": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))}
    wider["unet"][1].requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"another shape \(unet\.0\.\w+ is \[4.*\] there, \[8.*\] in this model"
    ):
        load_checkpoint(latest_checkpoint(tmp_path), wider)
