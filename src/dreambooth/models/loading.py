"""From a model source (hub id, folder, single file, cascade, run folder) to trainable stages.

A family is recognised from the pipeline class in `model_index.json` (a single file: from its
keys, or from its `--model-config` folder); each family module loads its own stages. Every
source problem is reported before any weights are read. Adding a family adds one entry to
`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from dreambooth.config import ModelConfig, RunConfig
from dreambooth.files import safetensors_keys
from dreambooth.models import deepfloyd_if, flux, sd, sd3, sdxl
from dreambooth.models._folders import hub_cache_snapshot
from dreambooth.models._latent import SINGLE_FILE_SUFFIXES
from dreambooth.models._quantize import quantize_problems
from dreambooth.models.builtin import BUILTIN_MODELS
from dreambooth.models.spec import Family, ModelSource

logger = logging.getLogger(__name__)

FAMILIES: dict[str, Family] = {
    family.name: family for family in (sd.FAMILY, sdxl.FAMILY, deepfloyd_if.FAMILY, sd3.FAMILY, flux.FAMILY)
}
PIPELINE_FAMILIES = {cls: family.name for family in FAMILIES.values() for cls in family.pipeline_classes}


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
        return ModelSource(_single_file_family(_check_single_file(path, cfg), cfg), str(path))
    if path.is_dir():
        return _resolve_folder(path, cfg)
    if path.exists():
        raise ValueError(f"model {source!r} is a file but not a checkpoint (.safetensors or .ckpt)")
    if _looks_local(source):
        raise FileNotFoundError(f"model path {source!r} does not exist")
    return _resolve_hub_id(source, cfg)


def _resolve_folder(path: Path, cfg: ModelConfig) -> ModelSource:
    # a cascade folder: stage_1/, stage_2/ and maybe stage_3/
    if (path / "stage_1" / "model_index.json").is_file():
        sr, upscaler = (path / "stage_2", path / "stage_3")
        return ModelSource("if", str(path / "stage_1"), cfg.sr_source or (str(sr) if sr.is_dir() else None),
                           cfg.upscaler_source or (str(upscaler) if upscaler.is_dir() else None))
    if (path / "run.json").is_file() and not (path / "model_index.json").exists():
        return _resolve_run(path, cfg)
    index = path / "model_index.json"
    if not index.is_file() and (snapshot := hub_cache_snapshot(path)) is not None:
        logger.info("model folder %s is a hub cache entry: reading its snapshot %s", path, snapshot.name)
        return _resolve_folder(snapshot, cfg)
    if not index.is_file():
        raise ValueError(
            f"model folder {str(path)!r} is not a diffusers model: it has no model_index.json "
            "(pass a diffusers pipeline folder, a single-file .safetensors checkpoint, or a hub id)"
        )
    return ModelSource(
        _family(_pipeline_class(index), str(path)), str(path), cfg.sr_source, cfg.upscaler_source
    )


def _resolve_run(path: Path, cfg: ModelConfig) -> ModelSource:
    """A run folder: its merged pipeline, else (a LoRA run saved without one) the model it was trained
    from."""
    if (path / "pipeline").is_dir():
        return _resolve_folder(path / "pipeline", cfg)
    try:
        model = json.loads((path / "run.json").read_text(encoding="utf-8"))["model"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"run folder {str(path)!r}: run.json is damaged ({error!r}) and there is no pipeline/ to load"
        ) from error
    base = run_base_model(model)
    return resolve_source(dataclasses.replace(base, sr_source=cfg.sr_source or base.sr_source,
                                              upscaler_source=cfg.upscaler_source or base.upscaler_source))


def run_base_model(recorded: dict) -> ModelConfig:
    """The pretrained model a run started from (run.json's "model"), every stage included."""
    return ModelConfig(
        source=recorded["source"], sr_source=recorded.get("sr"), upscaler_source=recorded.get("upscaler")
    )


def _pipeline_class(index: Path) -> str:
    """The `_class_name` of a model_index.json, or a ValueError naming the file."""
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
        return str(data["_class_name"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{str(index)!r} is damaged or not a diffusers model index ({type(error).__name__}: {error}); "
            "re-download or re-save the model folder"
        ) from error


def _resolve_hub_id(repo_id: str, cfg: ModelConfig) -> ModelSource:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(repo_id, revision=cfg.revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model {repo_id!r} is neither a local folder nor a hub model available here ({error}). "
            "Offline, pass the path of a local copy instead."
        ) from error
    return ModelSource(_family(index["_class_name"], repo_id), repo_id, cfg.sr_source, cfg.upscaler_source)


def _family(class_name: str, source: str) -> str:
    if class_name not in PIPELINE_FAMILIES:
        known = ", ".join(PIPELINE_FAMILIES)
        raise ValueError(f"model {source!r} is a {class_name}; this tool trains: {known}")
    return PIPELINE_FAMILIES[class_name]


def _check_single_file(path: Path, cfg: ModelConfig) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {str(path)!r} does not exist")
    if path.suffix == ".ckpt":
        if not cfg.allow_pickle:
            raise ValueError(
                f"{str(path)!r} is a pickle checkpoint, which can run arbitrary code when loaded. "
                "Prefer a .safetensors file; if you trust this file, pass --allow-pickle"
            )
        logger.warning("loading pickle checkpoint %s: only do this for files you trust", path)
    return path


def _single_file_family(path: Path, cfg: ModelConfig) -> str:
    """The family of a single-file checkpoint: its --model-config folder's, else the one whose keys it has."""
    if cfg.single_file_config is not None:
        index = Path(cfg.single_file_config) / "model_index.json"
        if not index.is_file():
            raise ValueError(
                f"--model-config {cfg.single_file_config!r} is not a diffusers pipeline folder (no "
                "model_index.json)"
            )
        return _family(_pipeline_class(index), cfg.single_file_config)
    if path.suffix != ".safetensors":
        return "sd"  # a pickle's keys cannot be read without unpickling it; SD is what .ckpt files hold
    keys = safetensors_keys(path, "model checkpoint")
    singles = [f for f in FAMILIES.values() if f.single_file_marker is not None]
    for family in singles:
        if any(key.startswith(family.single_file_marker) for key in keys):
            return family.name
    raise ValueError(
        f"{str(path)!r} is not a single-file checkpoint of a family this tool trains "
        f"({', '.join(f.name for f in singles)}); pass --model-config DIR naming a diffusers folder of its "
        "architecture"
    )


def _looks_local(source: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a missing path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def load_stages(source: ModelSource, cfg: RunConfig) -> list:
    """Load every stage of `source` in fp32 on CPU (the family reads its settings from `cfg`)."""
    return FAMILIES[source.family].load(source, cfg)


def trained_text_encoders(cfg: RunConfig, family: Family) -> tuple[str, ...]:
    """Component names of the text encoders a run trains (none unless --train-text-encoder)."""
    if not cfg.train.train_text_encoder:
        return ()
    return cfg.train.text_encoders if cfg.train.text_encoders is not None else family.text_encoders


def cascade_problems(cfg: RunConfig, source: ModelSource) -> list[str]:
    """Stages of a cascade asked for (--stages, --upscaler-model) that the model does not have; empty if
    none."""
    if not FAMILIES[source.family].cascade:
        return []
    present = {"base": source.base, "sr": source.sr, "upscaler": source.upscaler}
    how = {
        "sr": " (pass --sr-model)",
        "upscaler": " (pass --upscaler-model, e.g. stabilityai/stable-diffusion-x4-upscaler)",
    }
    problems = [f"--stages {name}: the cascade {cfg.model.source!r} has no {name} stage{how.get(name, '')}"
                for name in cfg.cascade.stages if present[name] is None]
    if source.upscaler is not None and source.sr is None:
        problems.append(
            "the upscaler (stage 3) upscales the super-resolution stage's output: pass --sr-model too"
        )
    return problems


def option_problems(cfg: RunConfig, family: Family) -> list[str]:
    """Options set in `cfg` that `family` has no use for, each naming its flag; empty if none."""
    problems = []
    if cfg.train.text_encoders is not None and (
        unknown := set(cfg.train.text_encoders) - set(family.text_encoders)
    ):
        problems.append(
            f"--text-encoders {' '.join(sorted(unknown))}: a {family.name} model's trainable text encoders "
            f"are {' '.join(family.text_encoders)}"
        )
    if cfg.optim.text_encoder_2_learning_rate is not None and "text_encoder_2" not in family.text_encoders:
        problems.append(
            "--text-encoder-2-learning-rate is for models with a second text encoder (SDXL); a "
            f"{family.name} model has one"
        )
    if cfg.model.vae is not None and not family.latent:
        problems.append(
            f"--vae replaces the VAE of a latent model (SD, SDXL); a {family.name} model denoises pixels"
        )
    if (size := cfg.subject.resolution) is not None:
        if family.cascade:
            problems.append(
                f"--resolution {size}: each stage of a cascade trains at its own size (IF: 64 and 256 px), "
                "which the next stage expects; drop --resolution"
            )
        elif size % 8:
            problems.append(
                f"--resolution {size}: a {family.name} model needs a multiple of 8 pixels (its VAE's factor)"
            )
    if cfg.model.sr_source is not None and not family.cascade:
        problems.append(
            f"--sr-model names the super-resolution stage of a cascade (IF); a {family.name} model has one "
            "stage"
        )
    if cfg.model.upscaler_source is not None and not family.cascade:
        problems.append(
            f"--upscaler-model names the third stage of a cascade (IF); a {family.name} model has one stage"
        )
    if cfg.output.save_single_file and family.single_file_marker is None:
        problems.append(
            f"--save-single-file writes SD/SDXL checkpoints; a {family.name} model has no single-file layout "
            "(the diffusers pipeline folder is its format)"
        )
    if (mode := cfg.model.quantize) != "none":
        if mode not in family.quantize:
            problems.append(
                f"--quantize {mode}: a {family.name} model loads "
                + (
                    f"with --quantize {' or '.join(family.quantize)}, or unquantised" if family.quantize
                    else "unquantised only"
                )
            )
        if cfg.lora.rank is None:
            problems.append(
                f"--quantize {mode} freezes the denoiser's weights: train LoRA adapters on it (--lora-rank "
                "N), or drop --quantize to fine-tune every weight"
            )
        if cfg.output.save_pipeline:
            problems.append(
                f"--quantize {mode}: the merged pipeline folder cannot be written from a quantised denoiser; "
                "pass --no-save-pipeline (the LoRA in lora/ loads onto the full-precision model)"
            )
    if cfg.model.quantize in family.quantize:
        problems += quantize_problems(cfg.model.quantize)  # the library and the GPU it needs here
    if family.lora_only is not None and cfg.lora.rank is None:
        problems.append(f"full fine-tuning of a {family.name} model is not offered ({family.lora_only}): "
                        "pass --lora-rank N (16-32 suits one subject)")
    return problems
