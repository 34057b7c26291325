"""DeepFloyd IF as released, on a tiny cascade with its properties (tiny_if.py): learned variance,
a case-sensitive T5 with dropout, a stage II with its own text encoder.

The pocket cascade (test_cascade.py) cannot show these: its schedulers use fixed variance and its
tokenizer lower-cases.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.config import ModelConfig, RunConfig
from dreambooth.finetune import SubjectName
from dreambooth.generate import SAMPLERS, generate, load_model
from dreambooth.models.deepfloyd_if import IFSuperResStage
from dreambooth.models.loading import load_stages, resolve_source
from dreambooth.seeding import RowRandom
from dreambooth.training import loop

from conftest import write_photos
from tiny_models import tiny_scorer_flags

FAST = [
    "--class-noun", "dog", "--max-steps", "2", "--sr-max-steps", "2", "--num-class-images", "2",
    "--class-steps", "2", "--validation-every", "0", "--validation-images", "1", "--validation-steps", "2",
    "--logger", "none",
]


def _stages(model: Path) -> list:
    config = ModelConfig(source=str(model))
    return load_stages(resolve_source(config), RunConfig(model=config))


@pytest.fixture(scope="module")
def lora_run(tiny_if: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run of both stages, its base and SR stage named separately (as hub ids would be), text encoder
    trained."""
    root = tmp_path_factory.mktemp("if-run")
    photos = write_photos(root / "photos")
    run = root / "run"
    argv = [
        "train", "--model", str(tiny_if / "stage_1"), "--sr-model", str(tiny_if / "stage_2"),
        "--instance-dir", str(photos), "--run-dir", str(run), "--lora-rank", "4", "--train-text-encoder",
        *FAST,
    ]
    assert main(argv) == 0
    return run


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_samples_a_learned_variance_cascade(tiny_if: Path, sampler: str) -> None:
    model = load_model(str(tiny_if), device="cpu")
    assert model.pipelines[0].scheduler.config.variance_type == "learned_range"
    images = generate(model.pipelines, ["a dog"], [0], steps=2, guidance=model.guidance, sampler=sampler)
    assert images[0].size == (32, 32)
    assert model.pipelines[0].scheduler.config.variance_type == "learned_range"  # restored after sampling


def test_training_tokenizes_the_text_the_pipeline_tokenizes(tiny_if: Path) -> None:
    base = _stages(tiny_if)[0]
    prompt = "  A photo of OHWX Dog "
    seen = base.pipeline._text_preprocessing(prompt, clean_caption=False)[0]  # what IFPipeline encodes
    assert seen == "a photo of ohwx dog"
    expected = base.pipeline.tokenizer(
        [seen], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(base.tokenize([prompt])["input_ids"], expected)
    assert not torch.equal(
        base.tokenize([prompt])["input_ids"],
        base.pipeline.tokenizer(
            [prompt], padding="max_length",
            # T5 here is case-sensitive
            max_length=77, truncation=True, return_tensors="pt",
        ).input_ids,
    )


def test_sr_augmentation_reaches_the_level_the_pipeline_samples_at(tiny_if: Path) -> None:
    sr = _stages(tiny_if)[1]
    assert isinstance(sr, IFSuperResStage)
    # IFSuperResolutionPipeline's noise_level
    top = IFSuperResStage(**{**sr.__dict__, "noise_level_range": (250, 250)})
    _, level = top.condition(torch.zeros(2, 3, 16, 16), RowRandom([0, 1]))
    assert level.tolist() == [250, 250]


def test_fine_tuned_stages_sample_with_fixed_variance(lora_run: Path, tiny_if: Path) -> None:
    for stage in ("stage_1", "stage_2"):
        tuned = DDPMScheduler.from_pretrained(lora_run / "pipeline" / stage / "scheduler")
        assert tuned.config.variance_type == "fixed_small"  # the variance channels did not train
        assert (
            DDPMScheduler.from_pretrained(tiny_if / stage / "scheduler").config.variance_type
            == "learned_range"
        )
    # The LoRA alone, loaded on the released model, samples the same way.
    lora_only = lora_run.parent / "lora-only"
    shutil.copytree(lora_run, lora_only, ignore=shutil.ignore_patterns("pipeline"))
    model = load_model(str(lora_only), device="cpu")
    assert [p.scheduler.config.variance_type for p in model.pipelines] == ["fixed_small", "fixed_small"]
    # Every adapter weight of the file reached the stock pipeline (none dropped for its key names).
    saved = load_file(lora_run / "lora" / "stage_1" / "pytorch_lora_weights.safetensors")
    for component in ("unet", "text_encoder"):  # IF's add_k_proj and T5's q/k/v/o included
        module = getattr(model.pipelines[0], component)
        loaded = [v for k, v in module.state_dict().items() if ".lora_A." in k or ".lora_B." in k]
        file = [v for k, v in sorted(saved.items()) if k.startswith(f"{component}.")]
        assert file and len(loaded) == len(file)
        assert sorted(v.sum().item() for v in loaded) == pytest.approx(
            sorted(v.sum().item() for v in file)
        ), component


def test_a_run_samples_and_evaluates_with_every_stage_it_trained(lora_run: Path, tmp_path: Path) -> None:
    """The pretrained row of an evaluation is the run's whole base cascade, not stage I alone."""
    lora_only = tmp_path / "lora-only"
    shutil.copytree(lora_run, lora_only, ignore=shutil.ignore_patterns("pipeline"))
    for run in (lora_run, lora_only):
        out = tmp_path / f"samples-{run.name}"
        assert (
            main([
                "generate", "--model", str(run), "--prompt", "a [V] dog", "--num-images", "1", "--steps", "2",
                "--out", str(out),
            ])
            == 0
        )
        assert Image.open(out / "000-0.png").size == (32, 32)

    photos = write_photos(tmp_path / "photos", n=2)
    argv = [
        "eval", str(lora_only), "--subject-dir", str(photos), *tiny_scorer_flags(tmp_path), "--max-prompts",
        "1", "--num-images", "1", "--steps", "2", "--device", "cpu",
    ]
    assert main(argv) == 0
    for row in ("finetuned", "pretrained"):
        assert Image.open(lora_only / "eval" / "samples" / row / "000-0.png").size == (32, 32), row
    record = json.loads((lora_only / "eval" / "eval.json").read_text())
    assert record["pretrained"]["sr_model"] is not None


def test_resumed_run_with_dropout_equals_the_uninterrupted_one(
    tiny_if: Path, tmp_path: Path, monkeypatch
) -> None:
    """T5's dropout (0.1) and LoRA dropout draw the same masks whether or not the run was interrupted."""
    photos = write_photos(tmp_path / "photos")
    argv = lambda run, *extra: [
        "train", "--model", str(tiny_if), "--instance-dir", str(photos), "--run-dir",
        str(run),  # noqa: E731
        "--lora-rank", "4", "--lora-dropout", "0.2", "--train-text-encoder", "--stages", "base",
        "--no-prior-preservation", "--no-save-pipeline", *FAST, "--max-steps", "4", "--checkpoint-every",
        "100", *extra,
    ]
    assert main(argv(tmp_path / "straight")) == 0

    calls, real = {"n": 0}, loop.compute_loss

    def interrupt_on_second_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", interrupt_on_second_step)
    assert main(argv(tmp_path / "resumed")) == 130
    monkeypatch.setattr(loop, "compute_loss", real)
    assert main(argv(tmp_path / "resumed", "--resume")) == 0

    def lora(run: Path) -> dict:
        return {**load_file(run / "lora" / "stage_1" / "pytorch_lora_weights.safetensors")}

    straight, resumed = lora(tmp_path / "straight"), lora(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = lambda run: [
        json.loads(line)["loss/total"] for line in (run / "logs" / "base.jsonl").read_text().splitlines()
    ]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_validation_samples_with_dropout_off(tiny_if: Path, tmp_path: Path, monkeypatch) -> None:
    from transformers import T5EncoderModel

    seen, forward = [], T5EncoderModel.forward

    def recording(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # sampling (validation), not a training step
            seen.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "forward", recording)
    photos = write_photos(tmp_path / "photos")
    argv = [
        "train", "--model", str(tiny_if), "--instance-dir", str(photos), "--run-dir", str(tmp_path / "run"),
        "--lora-rank", "4", "--train-text-encoder", "--stages", "base", "--no-prior-preservation",
        "--no-save-pipeline", *FAST, "--validation-every", "1",
    ]
    assert main(argv) == 0
    assert seen and not any(seen)


def test_a_caption_may_hold_braces() -> None:
    subject = SubjectName("xon", "dog")
    assert subject.fill("a {identifier} {class_noun} in a {curly} tent }") == "a xon dog in a {curly} tent }"


def test_a_cascade_refuses_resolution_before_loading(
    tiny_if: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert (
        main([
            "train", "--model", str(tiny_if), "--instance-dir", str(photos), "--run-dir", str(run), *FAST,
            "--resolution", "32",
        ])
        == 2
    )
    assert "--resolution 32" in capsys.readouterr().err and not run.exists()



# --- Memory (issue #17): one T5 for the cascade, fp16 files, one stage on the device at a time
# ---------------------


def test_stage_ii_gets_stage_i_text_encoder_when_its_files_are_the_same(
    tiny_if: Path, tmp_path: Path
) -> None:
    from dreambooth.config import TrainConfig
    from dreambooth.models.deepfloyd_if import load_if

    base, sr = load_if(str(tiny_if / "stage_1"), str(tiny_if / "stage_2"))
    assert sr.text_encoders["text_encoder"] is base.text_encoders["text_encoder"] is sr.pipeline.text_encoder
    apart = load_if(str(tiny_if / "stage_1"), str(tiny_if / "stage_2"), share_text_encoder=False)
    assert apart[1].pipeline.text_encoder is not apart[0].pipeline.text_encoder
    # A run that trains text encoders keeps them apart: one stage's training must not change the other's
    # encoder.
    config = ModelConfig(source=str(tiny_if))
    trains = load_stages(
        resolve_source(config), RunConfig(model=config, train=TrainConfig(train_text_encoder=True))
    )
    assert trains[1].pipeline.text_encoder is not trains[0].pipeline.text_encoder

    changed = tmp_path / "if"  # same config, same file sizes, one byte of the weights different
    shutil.copytree(tiny_if, changed)
    weights = changed / "stage_2" / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    base, sr = load_if(str(changed / "stage_1"), str(changed / "stage_2"))
    assert sr.pipeline.text_encoder is not base.pipeline.text_encoder


def _hub_snapshot(folder: Path, repo: Path) -> Path:
    """`folder` laid out as the hub cache keeps a snapshot: each file a symlink to a blob named by its
    sha256."""
    import hashlib

    snapshot = repo / "snapshots" / ("0" * 40)
    for file in (f for f in folder.rglob("*") if f.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return snapshot


def test_hub_cache_snapshots_share_the_text_encoder_by_blob(
    tiny_if: Path, tiny_cascade: Path, tmp_path: Path
) -> None:
    from dreambooth.models.deepfloyd_if import load_if

    base, sr = load_if(str(_hub_snapshot(tiny_if / "stage_1", tmp_path / "models--if-I")),
                       str(_hub_snapshot(tiny_if / "stage_2", tmp_path / "models--if-II")))
    assert sr.pipeline.text_encoder is base.pipeline.text_encoder
    base, sr = load_if(str(_hub_snapshot(tiny_cascade / "stage_1", tmp_path / "models--pocket-I")),
                       str(_hub_snapshot(tiny_cascade / "stage_2", tmp_path / "models--pocket-II")))
    assert sr.pipeline.text_encoder is not base.pipeline.text_encoder


def test_the_pocket_cascades_different_text_encoders_stay_apart(tiny_cascade: Path) -> None:
    from dreambooth.models.deepfloyd_if import load_if

    base, sr = load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2"))
    assert sr.text_encoders["text_encoder"] is not base.text_encoders["text_encoder"]
    assert sr.pipeline.text_encoder is not base.pipeline.text_encoder


def test_half_precision_weights_load_from_the_fp16_files_when_the_repo_ships_them(
    tiny_if: Path, tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel

    from dreambooth.models.deepfloyd_if import load_if

    model = tmp_path / "if"
    shutil.copytree(tiny_if, model)
    unet = UNet2DConditionModel.from_pretrained(model / "stage_1" / "unet")
    with torch.no_grad():
        unet.conv_in.bias.fill_(0.5)  # a value only the fp16 file holds
    unet.half().save_pretrained(model / "stage_1" / "unet", variant="fp16")

    (base,) = load_if(str(model / "stage_1"), dtype=torch.bfloat16)
    assert base.denoiser.dtype == torch.bfloat16 and bool((base.denoiser.conv_in.bias == 0.5).all())
    (base,) = load_if(str(model / "stage_1"))  # fp32 weights: the default files
    assert not bool((base.denoiser.conv_in.bias == 0.5).all())
    (base,) = load_if(str(model / "stage_1"), dtype=torch.bfloat16, variant="fp16")  # as asked
    assert bool((base.denoiser.conv_in.bias == 0.5).all())
    # no fp16 files
    base, sr = load_if(str(tiny_if / "stage_1"), str(tiny_if / "stage_2"), dtype=torch.bfloat16)
    assert base.denoiser.dtype == sr.denoiser.dtype == torch.bfloat16


def test_only_the_stage_that_trains_is_on_the_device(tiny_if: Path, tmp_path: Path, monkeypatch) -> None:
    """The device is faked as 'cpu:0', so that a UNet's moves onto it can be told from its moves back to the
    CPU."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from dreambooth import finetune

    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("cpu", 0)))
    where: dict[int, str] = {}  # id(UNet) -> the device of its latest move ("cpu" as loaded)
    to = UNet2DConditionModel.to

    def recording_to(self, *args, **kwargs):
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if target is not None:
            where[id(self)] = str(target)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "to", recording_to)
    loaded, load, train, seen = {}, finetune.load_stages, finetune.train_stage, []
    monkeypatch.setattr(finetune, "load_stages", lambda *args: loaded.setdefault("stages", load(*args)))

    def recording_train(stage, *args, **kwargs):
        seen.append({
            "training": stage.name, **{s.name: where.get(id(s.denoiser), "cpu") for s in loaded["stages"]},
        })
        return train(stage, *args, **kwargs)

    monkeypatch.setattr(finetune, "train_stage", recording_train)
    photos = write_photos(tmp_path / "photos")
    argv = [
        "train", "--model", str(tiny_if), "--instance-dir", str(photos), "--run-dir", str(tmp_path / "run"),
        # with prior preservation: class images through both stages
        "--lora-rank", "4", "--no-save-pipeline", *FAST,
    ]
    assert main(argv) == 0
    assert seen == [
        {"training": "base", "base": "cpu:0", "sr": "cpu"}, {"training": "sr", "base": "cpu", "sr": "cpu:0"},
    ]
    base, sr = loaded["stages"]
    # both went back after sampling and training
    assert [where[id(s.denoiser)] for s in (base, sr)] == ["cpu", "cpu"]
    assert sr.pipeline.text_encoder is base.pipeline.text_encoder  # one T5 for the run: it does not train
