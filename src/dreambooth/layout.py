"""Where everything of a run lives: one place that names the files of a run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CASCADE_STAGE_DIRS = {"base": "stage_1", "sr": "stage_2", "upscaler": "stage_3"}


@dataclass(frozen=True)
class StagePaths:
    """The files the training loop writes for one stage."""

    checkpoints: Path
    log: Path
    loss_plot: Path
    eval_log: Path
    eval_plot: Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.resolved.toml"

    @property
    def run_info(self) -> Path:
        """Identifier, model, stages and status of the run (JSON)."""
        return self.root / "run.json"

    @property
    def class_images(self) -> Path:
        return self.root / "class_images"

    @property
    def pipeline(self) -> Path:
        """The fine-tuned pipeline; for a cascade, a folder of stage_1/, stage_2/ pipelines."""
        return self.root / "pipeline"

    @property
    def single_file(self) -> Path:
        """The model as one checkpoint in the original Stable Diffusion layout (for the UIs)."""
        return self.root / "model.safetensors"

    def pipeline_stage(self, stage: str, cascade: bool) -> Path:
        return self.pipeline / CASCADE_STAGE_DIRS[stage] if cascade else self.pipeline

    def lora(self, stage: str, cascade: bool) -> Path:
        return self.root / "lora" / CASCADE_STAGE_DIRS[stage] if cascade else self.root / "lora"

    def checkpoints(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def stage(self, stage: str) -> StagePaths:
        logs = self.root / "logs"
        return StagePaths(
            checkpoints=self.checkpoints(stage), log=logs / f"{stage}.jsonl",
            loss_plot=logs / f"loss-{stage}.png", eval_log=logs / f"eval-{stage}.jsonl",
            eval_plot=logs / f"eval-{stage}.png",
        )

    @property
    def tensorboard(self) -> Path:
        return self.root / "logs" / "tensorboard"

    def samples(self, stage: str) -> Path:
        return self.root / "samples" / stage
