"""`dreambooth pocket pretrain` on a tiny architecture: it trains both stages, saves a cascade that
stock IF pipelines load and sample, resumes where it stopped, and refuses to resume without the
tokenizer its checkpoints were trained with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import IFPipeline, IFSuperResolutionPipeline

from dreambooth.generate import generate
from dreambooth.models.deepfloyd_if import NO_SAFETY
from dreambooth.pocket.model import PocketArchitecture
from dreambooth.pocket.pretrain import pretrain
from dreambooth.pocket.settings import PretrainConfig

from tiny_models import TINY_CASCADE


def _config(run_dir: Path, base_steps: int, sr_steps: int) -> PretrainConfig:
    return PretrainConfig(
        run_dir=run_dir, num_images=64, base_steps=base_steps, sr_steps=sr_steps, batch_size=4, warmup_steps=1
    )


def test_pretrain_saves_a_stock_if_cascade_and_resumes(tmp_path: Path) -> None:
    arch = PocketArchitecture(**TINY_CASCADE)
    out = pretrain(_config(tmp_path, 2, 2), arch=arch)
    base = IFPipeline.from_pretrained(out / "stage_1", dtype=torch.float32, **NO_SAFETY)
    sr = IFSuperResolutionPipeline.from_pretrained(out / "stage_2", dtype=torch.float32, **NO_SAFETY)
    assert sr.unet.config.norm_num_groups == arch.sr_norm_groups
    (image,) = generate([base, sr], ["a red cube on the beach"], [0], steps=2, guidance=[1.0, 1.0])
    assert image.size == (arch.sr_resolution, arch.sr_resolution)

    pretrain(_config(tmp_path, 3, 3), arch=arch)                 # trains on from step 2, not from scratch
    for stage in ("base", "sr"):
        steps = [
            json.loads(line)["step"]
            for line in (tmp_path / "logs" / f"{stage}.jsonl").read_text().splitlines()
        ]
        assert steps == [1, 2, 3]
    assert json.loads((out / "pretraining.json").read_text())["config"]["base_steps"] == 3


def test_pretrain_refuses_to_resume_checkpoints_without_their_tokenizer(tmp_path: Path) -> None:
    arch = PocketArchitecture(**TINY_CASCADE)
    pretrain(_config(tmp_path, 1, 1), arch=arch)
    shutil.rmtree(tmp_path / "init")
    with pytest.raises(FileNotFoundError, match="init"):
        pretrain(_config(tmp_path, 2, 2), arch=arch)
