"""A hub cache entry (`models--org--name/`, what `hf download` leaves) given as --model reads its snapshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dreambooth.config import ModelConfig, RunConfig
from dreambooth.models.loading import load_stages, resolve_source


def _load(folder: Path) -> list:
    cfg = RunConfig(model=ModelConfig(source=str(folder)))
    return load_stages(resolve_source(cfg.model), cfg)


def test_a_hub_cache_entry_reads_the_snapshot_refs_main_names(tiny_sd: Path, tmp_path: Path) -> None:
    entry = tmp_path / "models--org--tiny-sd"
    shutil.copytree(tiny_sd, entry / "snapshots" / "c0ffee")
    older = shutil.copytree(tiny_sd, entry / "snapshots" / "0ld")
    (older / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # an incomplete older download
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("c0ffee")

    (stage,) = _load(entry)
    (reference,) = _load(tiny_sd)
    ours, theirs = stage.denoiser.state_dict(), reference.denoiser.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_several_snapshots_without_refs_main_are_named(tiny_sd: Path, tmp_path: Path) -> None:
    entry = tmp_path / "models--org--tiny-sd"
    for name in ("a1", "b2"):
        shutil.copytree(tiny_sd, entry / "snapshots" / name)
    with pytest.raises(ValueError, match=r"2 snapshots and no refs/main: pass one of them \(.*a1, .*b2\)"):
        resolve_source(ModelConfig(source=str(entry)))
