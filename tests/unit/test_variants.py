"""Model folders that ship only variant weight files (`*.fp16.safetensors`), as `variant="fp16"`
downloads leave them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dreambooth.config import ModelConfig, RunConfig
from dreambooth.models._folders import folder_variant
from dreambooth.models.loading import load_stages, resolve_source


def _as_variant(folder: Path, components: dict[str, str]) -> None:
    """Rename each component's weight files to those of the given variant."""
    for component, variant in components.items():
        for weights in (folder / component).glob("*.safetensors"):
            stem, suffix = weights.name.split(".", 1)
            weights.rename(weights.with_name(f"{stem}.{variant}.{suffix}"))


def _load(folder: Path) -> list:
    cfg = RunConfig(model=ModelConfig(source=str(folder)))
    return load_stages(resolve_source(cfg.model), cfg)


def test_a_folder_of_fp16_files_only_loads_them(tiny_sd: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_sd, tmp_path / "fp16-only")
    _as_variant(folder, {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"})
    assert folder_variant(folder) == "fp16"
    (stage,) = _load(folder)
    (reference,) = _load(tiny_sd)
    for name in ("denoiser", "vae"):
        ours, theirs = getattr(stage, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_default_files_need_no_variant_and_mixed_variants_are_named(tiny_sd: Path, tmp_path: Path) -> None:
    assert folder_variant(tiny_sd) is None
    mixed = shutil.copytree(tiny_sd, tmp_path / "mixed")
    _as_variant(mixed, {"unet": "fp16"})
    assert folder_variant(mixed) == "fp16"  # the other components keep their default files
    _as_variant(mixed, {"vae": "bf16"})
    with pytest.raises(ValueError, match=r"\['bf16', 'fp16'\].*--variant"):
        folder_variant(mixed)
