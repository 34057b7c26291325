"""`dreambooth demo`: the whole method on the built-in pocket model, on CPU, in a few minutes.

Read top to bottom, like a notebook:
1. take a pocket subject and write its "casual photos" to a folder, as a user would;
2. fine-tune the pocket cascade on them with the ordinary trainer (rare-token identifier,
   class images and prior preservation, base and personalised super-resolution stages);
3. sample the pretrained and the fine-tuned model on new contexts and property changes, and
   "a [class]" before and after;
4. score everything with the world's scorers and write a contact sheet, metrics.json and a table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from dreambooth.config import (
    CascadeConfig,
    CheckpointConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    PriorConfig,
    RunConfig,
    SubjectConfig,
    TrainConfig,
    ValidationConfig,
)
from dreambooth.files import read_json, write_json
from dreambooth.finetune import finetune
from dreambooth.generate import expand_prompts, generate_cascades, load_model
from dreambooth.grid import image_grid, upscale_for_viewing
from dreambooth.pocket.evaluate import format_table, score_model, super_resolved_detail
from dreambooth.pocket.scorers import PocketScorer
from dreambooth.pocket.settings import DemoConfig
from dreambooth.pocket.subjects import (
    SUBJECTS,
    Subject,
    make_subject,
    photo_scenes,
    subject_photos,
    write_subject_photos,
)
from dreambooth.pocket.world import CONTEXTS


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; return its metrics (also written to <run_dir>/metrics.json)."""
    started = time.time()
    subject = make_subject(cfg.subject_seed) if cfg.subject_seed is not None else _ready_subject(cfg.subject)

    # 1. The user's photos.
    photos_dir = cfg.run_dir / "photos"
    write_subject_photos(subject, photos_dir, n=cfg.num_photos, seed=cfg.seed)
    photos = subject_photos(subject, cfg.num_photos, cfg.seed)

    # 2. DreamBooth, with the same trainer as any model.
    layout = finetune(_run_config(cfg, subject, photos_dir))
    identifier = read_json(layout.run_info)["identifier"]

    # 3. Before and after, same prompts and seeds.
    prompts = demo_prompts(
        subject, identifier,
        shown={scene.context for scene in photo_scenes(subject, cfg.num_photos, cfg.seed)},
    )
    class_prompt = f"a {subject.cls}"
    pretrained, tuned = load_model(cfg.model, device="cpu"), load_model(str(layout.root), device="cpu")
    cascades = {
        "pretrained": pretrained.pipelines,
        "fine-tuned": tuned.pipelines,
        "fine-tuned base + pretrained SR": [tuned.pipelines[0], pretrained.pipelines[1]],
    }
    # the fine-tuned base is sampled once for both SRs
    samples = _sample(cascades, [*prompts, class_prompt], cfg)

    # 4. Scores and pictures.
    scorer = PocketScorer.load()
    scores = {
        name: score_model(scorer, subject, photos, {p: by[p] for p in prompts}, by[class_prompt])
        for name, by in samples.items()
    }
    sr_detail = (
        super_resolved_detail(
            scorer, subject, identifier,
            {"pretrained SR": pretrained.pipelines[1], "personalised SR": tuned.pipelines[1]},
            steps=cfg.sampling_steps, seed=cfg.seed,
        )
        if cfg.sr_steps else None
    )
    sheet = cfg.run_dir / "contact_sheet.png"
    contact_sheet(photos, prompts, class_prompt, samples["pretrained"], samples["fine-tuned"]).save(sheet)
    table = format_table(scores)
    result = {
        "subject": subject.name, "class_noun": subject.cls, "identifier": identifier, "prompts": prompts,
        "prior_preservation": cfg.prior_preservation, "scores": {k: v.as_dict() for k, v in scores.items()},
        "sr_detail_on_renders": sr_detail, "seconds": round(time.time() - started, 1),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    write_json(cfg.run_dir / "metrics.json", result)
    print(
        f"\nsubject {subject.name!r} ({subject.cls}), identifier [V] = {identifier!r}, {result['seconds']} "
        f"s\n{table}"
    )
    if sr_detail:
        print("fine detail of the subject's true renders, downsampled and super-resolved: "
              + ", ".join(f"{name} {value:.3f}" for name, value in sr_detail.items()))
    print(
        f"\ncontact sheet: {sheet}\nmetrics: {cfg.run_dir / 'metrics.json'}\nfine-tuned model: "
        f"{layout.pipeline}"
    )
    return result


def demo_prompts(subject: Subject, identifier: str, shown: set[str]) -> list[str]:
    """New contexts (those no photo shows) and property changes, DreamBench-style."""
    key = f"a {identifier} {subject.cls}"
    contexts = [f"{key} {phrase}" for name, phrase in CONTEXTS.items() if name not in shown]
    return [
        *contexts, f"a small {identifier} {subject.cls}", f"a tilted {identifier} {subject.cls} on the left",
    ]


def contact_sheet(photos, prompts, class_prompt, before: dict, after: dict) -> Image.Image:
    """Photos; then per prompt, pretrained (left) vs fine-tuned (right); then 'a [class]' before/after."""
    gap = Image.new("RGB", (12, 64), "white")
    view = lambda images: [upscale_for_viewing(im, 96) for im in images]  # noqa: E731
    rows = [view(photos)] + [view(before[p]) + [gap] + view(after[p]) for p in [*prompts, class_prompt]]
    labels = ["the subject's photos"] + [f"{p}   (pretrained | fine-tuned)" for p in [*prompts, class_prompt]]
    return image_grid(rows, labels)


def _sample(
    cascades: dict[str, list], prompts: list[str], cfg: DemoConfig
) -> dict[str, dict[str, list[Image.Image]]]:
    """Cascade name -> prompt -> its images (seeds seed, seed + 1, ...)."""
    n = cfg.images_per_prompt
    images = generate_cascades(
        cascades, *expand_prompts(prompts, n, cfg.seed), steps=cfg.sampling_steps, guidance=[4.0, 4.0],
        batch_size=32, progress="sample",
    )
    return {
        name: {p: ims[i * n : (i + 1) * n] for i, p in enumerate(prompts)} for name, ims in images.items()
    }


def _run_config(cfg: DemoConfig, subject: Subject, photos_dir: Path) -> RunConfig:
    return RunConfig(
        model=ModelConfig(source=cfg.model),
        subject=SubjectConfig(instance_dir=photos_dir, class_noun=subject.cls),
        prior=PriorConfig(
            enabled=cfg.prior_preservation, num_class_images=cfg.num_class_images, steps=cfg.sampling_steps,
            batch_size=32, guidance_scale=4.0,
        ),
        optim=OptimConfig(learning_rate=2e-4),
        train=TrainConfig(max_steps=cfg.base_steps, batch_size=4, seed=cfg.seed),
        cascade=CascadeConfig(
            stages=("base", "sr") if cfg.sr_steps else ("base",), sr_max_steps=cfg.sr_steps or None,
            sr_learning_rate=cfg.sr_learning_rate,
        ),
        validation=ValidationConfig(every_n_steps=0, num_images=2, steps=cfg.sampling_steps),
        checkpoint=CheckpointConfig(every_n_steps=100, keep_last=1),
        output=OutputConfig(run_dir=cfg.run_dir / "run", overwrite=True, logger="none"),
    )


def _ready_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ValueError(
            f"unknown pocket subject {name!r}; ready ones: {', '.join(SUBJECTS)} (or --subject-seed N for a "
            "new one)"
        )
    return SUBJECTS[name]
