"""From a model source (hub id, folder, single file, cascade, run folder) to trainable stages.

A family is recognised from the pipeline class in `model_index.json`; each family module loads
its own stages. Every source problem is reported before any weights are read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dreambooth.config import SR_NOISE_LEVELS, ModelConfig
from dreambooth.models.builtin import BUILTIN_MODELS

logger = logging.getLogger(__name__)

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "IFPipeline": "if",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: which family, and where each stage's pipeline lives."""

    family: str
    base: str
    sr: str | None = None

    @property
    def is_cascade(self) -> bool:
        return self.family == "if"


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Find the family and stage locations of `cfg.source` without loading weights.

    Raises:
        FileNotFoundError: if a local path does not exist.
        ValueError: if the path is not a model this tool can train, with what to pass instead.
    """
    builtin = BUILTIN_MODELS.get(cfg.source)
    source = str(builtin.path) if builtin is not None else cfg.source
    path = Path(source).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        return ModelSource("sd", _check_single_file(path, cfg))
    if path.is_dir():
        return _resolve_folder(path, cfg.sr_source)
    if path.exists():
        raise ValueError(f"model {source!r} is a file but not a checkpoint (.safetensors or .ckpt)")
    if _looks_local(source):
        raise FileNotFoundError(f"model path {source!r} does not exist")
    return _resolve_hub_id(source, cfg)


def _resolve_folder(path: Path, sr_source: str | None) -> ModelSource:
    if (path / "stage_1" / "model_index.json").is_file():  # a cascade folder: stage_1/, stage_2/
        sr = path / "stage_2"
        return ModelSource("if", str(path / "stage_1"), sr_source or (str(sr) if sr.is_dir() else None))
    if (path / "pipeline").is_dir() and not (path / "model_index.json").exists():  # a run folder
        return _resolve_folder(path / "pipeline", sr_source)
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"model folder {str(path)!r} is not a diffusers model: it has no model_index.json "
            "(pass a diffusers pipeline folder, a single-file .safetensors checkpoint, or a hub id)"
        )
    return ModelSource(_family(json.loads(index.read_text())["_class_name"], str(path)), str(path), sr_source)


def _resolve_hub_id(repo_id: str, cfg: ModelConfig) -> ModelSource:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(repo_id, revision=cfg.revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model {repo_id!r} is neither a local folder nor a hub model available here ({error}). "
            "Offline, pass the path of a local copy instead."
        ) from error
    return ModelSource(_family(index["_class_name"], repo_id), repo_id, cfg.sr_source)


def _family(class_name: str, source: str) -> str:
    if class_name not in PIPELINE_FAMILIES:
        known = ", ".join(PIPELINE_FAMILIES)
        raise ValueError(f"model {source!r} is a {class_name}; this tool trains: {known}")
    return PIPELINE_FAMILIES[class_name]


def _check_single_file(path: Path, cfg: ModelConfig) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {str(path)!r} does not exist")
    if path.suffix == ".ckpt":
        if not cfg.allow_pickle:
            raise ValueError(
                f"{str(path)!r} is a pickle checkpoint, which can run arbitrary code when loaded. "
                "Prefer a .safetensors file; if you trust this file, pass --allow-pickle"
            )
        logger.warning("loading pickle checkpoint %s: only do this for files you trust", path)
    return str(path)


def _looks_local(source: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a missing path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def load_stages(source: ModelSource, cfg: ModelConfig, noise_level_range: tuple[int, int] = SR_NOISE_LEVELS) -> list:
    """Load every stage of `source` in fp32 on CPU."""
    if source.family == "sd":
        from dreambooth.models.sd import load_sd

        return load_sd(source.base, single_file_config=cfg.single_file_config, revision=cfg.revision, variant=cfg.variant)
    from dreambooth.models.deepfloyd_if import load_if

    return load_if(source.base, source.sr, noise_level_range=noise_level_range, revision=cfg.revision, variant=cfg.variant)
