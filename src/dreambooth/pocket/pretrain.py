"""Pretraining the pocket cascade on the procedural world, with the trainer's own step and loop.

No identifier and no prior term: plain text-to-image training (the text encoder learns from
scratch with the base stage; the SR stage reuses it frozen), caption dropout for classifier-free
guidance, EMA weights. Both stages checkpoint and resume like any run:
`dreambooth pocket pretrain` can be stopped at any moment and rerun to continue.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from dreambooth._config_io import to_dict
from dreambooth.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from dreambooth.data.training_set import TrainingSet, encode_captions, encode_examples
from dreambooth.files import with_usual_permissions, write_json
from dreambooth.generate import generate
from dreambooth.grid import image_grid, upscale_for_viewing
from dreambooth.layout import CASCADE_STAGE_DIRS, RunLayout
from dreambooth.models.deepfloyd_if import load_if
from dreambooth.pocket.model import PocketArchitecture, build_cascade
from dreambooth.pocket.settings import PretrainConfig
from dreambooth.pocket.world import sample_dataset
from dreambooth.training.loop import StagePlan, train_stage
from dreambooth.training.state import latest_checkpoint

logger = logging.getLogger(__name__)

PREVIEW_PROMPTS = (
    "a red cube on the beach", "a blue ball in the snow", "a yellow star in the jungle",
    "a green cup on the grass", "a white bottle on a wooden floor", "a purple teddy on pink fabric",
    "a cube in the city at night", "a ball under water", "a star in front of a brick wall",
    "a cup with a mountain in the background",
)


def pretrain(cfg: PretrainConfig, arch: PocketArchitecture = PocketArchitecture()) -> Path:
    """Pretrain both stages (resuming where a previous call stopped); save the cascade in fp16.

    Returns the folder of the pretrained cascade (stage_1/, stage_2/).
    """
    layout = RunLayout(cfg.run_dir)
    init = cfg.run_dir / "init"
    if not (init / CASCADE_STAGE_DIRS["sr"] / "model_index.json").is_file():
        if any(latest_checkpoint(layout.checkpoints(name)) for name in CASCADE_STAGE_DIRS):
            # A rebuilt tokenizer may number tokens differently, which would silently scramble the
            # prompts of the checkpointed text encoder.
            raise FileNotFoundError(
                f"{init} is missing but {cfg.run_dir} holds checkpoints trained with its tokenizer: "
                "restore init/ from a backup, or start over with a new --run-dir"
            )
        build_cascade(init, arch, cfg.seed)
    base, sr = load_if(
        str(init / CASCADE_STAGE_DIRS["base"]), str(init / CASCADE_STAGE_DIRS["sr"]),
        noise_level_range=cfg.sr_noise_levels,
    )
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    for stage in (base, sr):
        stage.pipeline.to(accelerator.device)

    started = time.time()
    renders, captions, _ = sample_dataset(cfg.num_images, cfg.seed)               # uint8 [n, 64, 64, 3]
    images = [Image.fromarray(r) for r in renders]
    logger.info("rendered %d scenes in %.1f s", len(images), time.time() - started)

    base_data = TrainingSet(encode_examples(base, images, captions, chunk=1024))
    train_stage(
        base, base_data, _plan(cfg, cfg.base_steps, train_text_encoder=True), layout.stage("base"),
        accelerator, _previewer(cfg, layout, [base], "base"),
    )
    # one text encoder for the cascade
    sr.text_encoders["text_encoder"].load_state_dict(base.text_encoders["text_encoder"].state_dict())
    sr_examples = encode_examples(sr, images, captions, chunk=1024)
    sr_data = TrainingSet(sr_examples, text_cache=encode_captions(sr, sr_examples.captions))
    train_stage(
        sr, sr_data, _plan(cfg, cfg.sr_steps, train_text_encoder=False), layout.stage("sr"), accelerator,
        _previewer(cfg, layout, [base, sr], "sr"),
    )

    out = cfg.run_dir / "cascade"
    for stage in (base, sr):
        stage.pipeline.to("cpu", torch.float16).save_pretrained(out / CASCADE_STAGE_DIRS[stage.name])
        stage.pipeline.to(torch.float32)
    with_usual_permissions(out)
    write_json(
        out / "pretraining.json", {"config": to_dict(cfg), "training_seconds": _training_seconds(layout)}
    )
    if cfg.export_to is not None:
        shutil.copytree(out, cfg.export_to, dirs_exist_ok=True)
    return out


def _plan(cfg: PretrainConfig, steps: int, *, train_text_encoder: bool) -> StagePlan:
    train = TrainConfig(
        max_steps=steps, batch_size=cfg.batch_size, mixed_precision=cfg.mixed_precision,
        train_text_encoder=train_text_encoder, caption_dropout=cfg.caption_dropout, ema_decay=cfg.ema_decay,
        seed=cfg.seed,
    )
    optim = OptimConfig(
        learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, lr_warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
    )
    return StagePlan(
        train=train, optim=optim, lora=LoraConfig(),
        checkpoint=CheckpointConfig(every_n_steps=cfg.checkpoint_every, keep_last=cfg.keep_checkpoints),
        learning_rate=cfg.learning_rate,
        text_encoder_learning_rates={"text_encoder": cfg.learning_rate} if train_text_encoder else {},
        prior_weight=0.0, validate_every=(cfg.preview_every,),
    )


def _previewer(cfg: PretrainConfig, layout: RunLayout, stages: list, name: str):
    def preview(step: int) -> None:
        images = generate(
            [s.pipeline for s in stages], list(PREVIEW_PROMPTS), list(range(len(PREVIEW_PROMPTS))),
            steps=cfg.preview_steps, guidance=[cfg.preview_guidance] * len(stages),
        )
        out = layout.samples(name) / f"step-{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid([[upscale_for_viewing(im) for im in images]]).save(out)

    return preview


def _training_seconds(layout: RunLayout) -> dict[str, float | None]:
    """Wall-clock seconds each stage trained, summed over resumes (from its step log)."""
    seconds: dict[str, float | None] = {}
    for name in ("base", "sr"):
        lines = layout.stage(name).log.read_text().splitlines()
        seconds[name] = json.loads(lines[-1]).get("elapsed_s") if lines else None
    return seconds
