"""`dreambooth export RUN --format FORMAT`: a run's weights in the file a tool loads, at any time.

Every input is checked before a weight is read. The weights come from the run's finished outputs
(`lora/` or `pipeline/`) or, with `--checkpoint`, from one of its checkpoints (the base model plus
the checkpoint's trained weights, EMA applied where the run kept one). Files are written under
a temporary name and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dreambooth._config_io import from_dict
from dreambooth._config_io import load_file as load_config_file
from dreambooth.config import ModelConfig, RunConfig
from dreambooth.export.formats import FORMATS, KOHYA_WRITERS, LORA_FORMATS, SINGLE_FILE_FAMILIES, families_of
from dreambooth.export.modelspec import export_metadata, modelspec_architecture
from dreambooth.export.pipeline import to_fp32_cpu
from dreambooth.export.single_file import export_single_file
from dreambooth.files import read_json, with_usual_permissions
from dreambooth.layout import CASCADE_STAGE_DIRS, RunLayout
from dreambooth.models.loading import FAMILIES, load_stages, resolve_source, trained_text_encoders
from dreambooth.models.lora import LORA_FILE, add_lora, load_lora_weights, merge_lora, save_lora
from dreambooth.models.spec import Stage, trainable_modules
from dreambooth.options import ExportRequest
from dreambooth.training.state import BEST_DIR, OPTIMIZER_FILE, TRAINABLE_FILE, load_checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export(request: ExportRequest) -> Path:
    """Write `request.run`'s weights in `request.format`; return what was written.

    Raises:
        FileNotFoundError / ValueError: for any problem with the request, before weights load.
    """
    plan = _check(request)
    with tempfile.TemporaryDirectory(dir=plan.out.parent, prefix=".export-") as scratch:
        written = _write(plan, Path(scratch))
        if plan.out.exists():  # --overwrite, checked above
            shutil.rmtree(plan.out) if plan.out.is_dir() else plan.out.unlink()
        with_usual_permissions(written).rename(plan.out)
    logger.info("wrote %s (%s)", plan.out, request.format)
    return plan.out


@dataclass(frozen=True)
class _Plan:
    request: ExportRequest
    layout: RunLayout
    info: dict
    cfg: RunConfig
    out: Path
    checkpoints: dict[str, Path]
    """Trained stage name -> the checkpoint to export (empty: the finished weights)."""

    @property
    def lora(self) -> bool:
        return self.info.get("method") == "lora"

    @property
    def cascade(self) -> bool:
        return FAMILIES[self.info["model"]["family"]].cascade


def _check(request: ExportRequest) -> _Plan:
    layout = RunLayout(request.run)
    if not layout.run_info.is_file() or not layout.config.is_file():
        raise FileNotFoundError(
            f"{str(request.run)!r} is not a run folder (no run.json and config.resolved.toml): "
            "pass the folder `dreambooth train` wrote (--run-dir)"
        )
    info, cfg = read_json(layout.run_info), from_dict(RunConfig, load_config_file(layout.config))
    family, fmt, lora = info["model"]["family"], request.format, info.get("method") == "lora"
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if (served := families_of(fmt)) is not None and family not in served:
        instead = (
            "ComfyUI loads an SD3 LoRA in diffusers' layout: export 'lora-diffusers'"
            if family == "sd3" and lora else "export 'diffusers' or 'lora-diffusers' instead"
        )
        raise ValueError(
            f"--format {fmt}: a {family} model has no such layout in the UIs (it serves "
            f"{', '.join(served)}); {instead}"
        )
    if fmt in LORA_FORMATS and not lora:
        raise ValueError(
            f"--format {fmt}: this run fine-tuned all weights (no LoRA); export 'diffusers' or 'single-file'"
        )
    if fmt in ("diffusers", "single-file") and lora and not request.merge:
        raise ValueError(
            f"--format {fmt} of a LoRA run needs --merge (the adapters folded into a copy of the base "
            "model), or export 'lora-diffusers' / 'lora-kohya' to keep the adapters separate"
        )
    if request.merge and not lora:
        logger.warning("--merge: this run has no LoRA adapters to merge; it is ignored")
    out = request.out or layout.root / "exports" / _default_name(fmt, info)
    if fmt == "single-file" and out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r}: a single file must end in .safetensors, which the UIs list")
    if out.exists() and not request.overwrite:
        raise ValueError(
            f"{str(out)!r} already exists: pass --overwrite to replace it, or --out for another path"
        )
    checkpoints = _checkpoints(layout, info, request.checkpoint) if request.checkpoint else {}
    if not checkpoints:
        _check_finished(layout, info, lora)
    out.parent.mkdir(parents=True, exist_ok=True)  # last: a refused request leaves the run folder as it was
    return _Plan(request, layout, info, cfg, out, checkpoints)


def _default_name(fmt: str, info: dict) -> str:
    stem = f"{info['identifier'].replace(' ', '_')}-{info['class_noun'].replace(' ', '_')}"
    return {"diffusers": "diffusers", "lora-diffusers": "lora", "lora-kohya": f"{stem}-lora.safetensors",
            "single-file": f"{stem}.safetensors"}[fmt]


def _checkpoints(layout: RunLayout, info: dict, name: str) -> dict[str, Path]:
    found = {stage: layout.checkpoints(stage) / name for stage in info["stages"]}
    for stage, path in found.items():
        if not (path / TRAINABLE_FILE).is_file():
            have = sorted(
                p.name for p in layout.checkpoints(stage).glob("step-*") if (p / TRAINABLE_FILE).is_file()
            )
            have += [BEST_DIR] if (layout.checkpoints(stage) / BEST_DIR / TRAINABLE_FILE).is_file() else []
            raise FileNotFoundError(
                f"--checkpoint {name}: stage {stage} has no such checkpoint in {layout.checkpoints(stage)} "
                f"(it has: {', '.join(have) or 'none'})"
            )
    return found


def _check_finished(layout: RunLayout, info: dict, lora: bool) -> None:
    cascade = FAMILIES[info["model"]["family"]].cascade
    needed = [layout.lora(s, cascade) / LORA_FILE for s in info["stages"]] if lora else [layout.pipeline]
    if info.get("status") == "done" and all(p.exists() for p in needed):
        return
    newest = sorted({p.name for s in info["stages"] for p in layout.checkpoints(s).glob("step-*")})
    hint = (
        f"export a checkpoint instead: --checkpoint {newest[-1]}" if newest
        else "it has no checkpoint either: train it first"
    )
    what = "LoRA weights" if lora else "pipeline folder (it was trained with --no-save-pipeline)"
    raise ValueError(
        f"run {str(layout.root)!r} has no finished {what} (status: {info.get('status')}); {hint}"
    )


def _write(plan: _Plan, scratch: Path) -> Path:
    """Build the export inside `scratch`; return its path there."""
    fmt, request = plan.request.format, plan.request
    stages = _load_base(plan) if plan.lora or plan.checkpoints else _load_finished(plan)
    trained = [s for s in stages if s.name in plan.info["stages"]]
    if plan.checkpoints:
        _apply_checkpoints(plan, trained)
    if plan.lora and plan.checkpoints:  # the adapters as diffusers writes them, then folded in (peft)
        lora_files = {s.name: save_lora(s, scratch / "checkpoint-lora" / s.name) for s in trained}
        for stage in trained:
            merge_lora(stage)
    elif plan.lora:  # the run's own files, folded in by diffusers' loader
        lora_files = {s.name: plan.layout.lora(s.name, plan.cascade) / LORA_FILE for s in trained}
        if fmt not in LORA_FORMATS:
            for stage in trained:
                load_lora_weights(stage.pipeline, lora_files[stage.name].parent, weight_name=LORA_FILE)
                stage.pipeline.fuse_lora()
                stage.pipeline.unload_lora_weights()
    family = plan.info["model"]["family"]
    architecture = modelspec_architecture(stages[0].pipeline) if family in SINGLE_FILE_FAMILIES else None
    metadata = export_metadata(plan.info, lora=fmt in LORA_FORMATS, architecture=architecture)
    if fmt == "lora-diffusers":
        return _copy_lora(lora_files, scratch / "lora", plan.cascade, metadata)
    if fmt == "lora-kohya":
        (stage,) = stages
        write = KOHYA_WRITERS[family]
        return write(
            lora_files[stage.name], scratch / "lora.safetensors", base=stage.pipeline, metadata=metadata
        )
    for stage in stages:
        to_fp32_cpu(stage.pipeline)
    if fmt == "single-file":
        (stage,) = stages
        return export_single_file(
            stage.pipeline, scratch / "model.safetensors", DTYPES[request.dtype], metadata=metadata
        )
    folder = scratch / "diffusers"
    for stage in stages:
        target = folder / CASCADE_STAGE_DIRS[stage.name] if plan.cascade else folder
        stage.pipeline.to(dtype=DTYPES[request.dtype]).save_pretrained(target, safe_serialization=True)
    return folder


def _load_base(plan: _Plan) -> list[Stage]:
    """The run's base model (its config's model, unquantised and fp32: exports hold full weights), on CPU."""
    cfg = dataclasses.replace(
        plan.cfg, model=dataclasses.replace(plan.cfg.model, quantize="none", dtype="fp32")
    )
    return load_stages(resolve_source(cfg.model), cfg)


def _load_finished(plan: _Plan) -> list[Stage]:
    """A full fine-tune's saved pipeline."""
    cfg = dataclasses.replace(plan.cfg, model=ModelConfig(source=str(plan.layout.pipeline), dtype="fp32"))
    return load_stages(resolve_source(cfg.model), cfg)


def _apply_checkpoints(plan: _Plan, stages: list[Stage]) -> None:
    """Load each trained stage's checkpoint weights (with LoRA adapters for a LoRA run), EMA applied."""
    cfg = plan.cfg
    encoders = trained_text_encoders(cfg, FAMILIES[plan.info["model"]["family"]])
    for stage in stages:
        modules = trainable_modules(stage, encoders)
        if plan.lora:
            add_lora(stage, cfg.lora, modules)
        else:
            for module in modules.values():
                module.requires_grad_(True)
        path = plan.checkpoints[stage.name]
        if (path / OPTIMIZER_FILE).is_file():
            _, state = load_checkpoint(path, modules)
            _apply_ema(modules, state.get("ema"))
        else:  # the kept best: weights only
            weights = load_file(path / TRAINABLE_FILE)
            with torch.no_grad():
                for key, param in _named_trainable(modules).items():
                    param.copy_(weights[key])


def _named_trainable(modules) -> dict[str, torch.nn.Parameter]:
    return {f"{n}.{p}": v for n, m in modules.items() for p, v in m.named_parameters() if v.requires_grad}


def _apply_ema(modules, ema_state: dict | None) -> None:
    if ema_state is None:
        return
    from diffusers.training_utils import EMAModel

    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    ema = EMAModel(params)
    ema.load_state_dict(ema_state)
    ema.copy_to(params)


def _copy_lora(files: dict[str, Path], folder: Path, cascade: bool, metadata: dict[str, str]) -> Path:
    """The diffusers-layout LoRA file(s) with the run's metadata added to their headers."""
    for stage, path in files.items():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = dict(f.metadata() or {})
        target = folder / CASCADE_STAGE_DIRS[stage] if cascade else folder
        target.mkdir(parents=True, exist_ok=True)
        save_file(load_file(path), target / LORA_FILE, metadata={**header, **metadata})
    return folder
