"""`dreambooth export`: every format reloads through an independent loader and gives the run's image."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from dreambooth.cli import main

from conftest import write_photos

FAST = [
    "--class-noun", "dog", "--num-class-images", "2", "--class-steps", "2", "--class-batch-size", "2",
    "--validation-every", "0", "--validation-images", "1", "--validation-steps", "2", "--checkpoint-every",
    "1", "--logger", "none", "--max-steps", "2", "--keep-checkpoints", "3",
]
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--train-text-encoder", "--learning-rate", "1e-2"]


def _train(model: Path, run: Path, *extra: str) -> Path:
    photos = write_photos(run.parent / f"{run.name}-photos")
    assert (
        main([
            "train", "--model", str(model), "--instance-dir", str(photos), "--run-dir", str(run), *FAST,
            *extra,
        ])
        == 0
    )
    return run


def _sample(pipe, prompt: str = "a dog") -> np.ndarray:
    return pipe(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]


def _export(run: Path, *flags: str) -> int:
    return main(["export", str(run), *flags])


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def sdxl_lora_run(tiny_sdxl: Path, tmp_path_factory) -> Path:
    return _train(tiny_sdxl, tmp_path_factory.mktemp("export") / "sdxl-lora", *LORA)


@pytest.fixture(scope="module")
def sd_full_run(tiny_sd: Path, tmp_path_factory) -> Path:
    return _train(tiny_sd, tmp_path_factory.mktemp("export") / "sd-full", "--learning-rate", "1e-3")


def test_sdxl_lora_exports_reload_in_diffusers_with_the_runs_image(
    sdxl_lora_run: Path, tiny_sdxl: Path, tmp_path: Path
) -> None:
    run = sdxl_lora_run
    merged = _sample(StableDiffusionXLPipeline.from_pretrained(run / "pipeline"))
    info = json.loads((run / "run.json").read_text())

    assert _export(run, "--format", "lora-diffusers", "--out", str(tmp_path / "lora")) == 0
    assert _export(run, "--format", "lora-kohya", "--out", str(tmp_path / "kohya.safetensors")) == 0
    for folder, name in (
        (tmp_path / "lora", "pytorch_lora_weights.safetensors"), (tmp_path, "kohya.safetensors"),
    ):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(str(folder), weight_name=name)
        assert np.abs(_sample(pipe) - merged).max() < 2e-3, name
        header = _header(folder / name)
        assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora", name
        assert header["modelspec.trigger_phrase"] == f"{info['identifier']} dog"
        assert (
            header["dreambooth.identifier"] == info["identifier"]
            and header["modelspec.resolution"] == "64x64"
        )

    single = tmp_path / "merged.safetensors"
    assert _export(run, "--format", "single-file", "--merge", "--dtype", "fp32", "--out", str(single)) == 0
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(tiny_sdxl), local_files_only=True
    )
    assert np.abs(_sample(pipe) - merged).max() < 2e-3
    assert _header(single)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_a_checkpoint_exports_its_own_weights(sdxl_lora_run: Path, tiny_sdxl: Path, tmp_path: Path) -> None:
    """--checkpoint step-000001 is the first step's adapters: another image than the finished run's."""
    out = tmp_path / "lora"
    assert (
        _export(sdxl_lora_run, "--format", "lora-diffusers", "--checkpoint", "step-000002", "--out", str(out))
        == 0
    )
    last = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    last.load_lora_weights(str(out))
    assert (
        np.abs(
            _sample(last) - _sample(StableDiffusionXLPipeline.from_pretrained(sdxl_lora_run / "pipeline"))
        ).max()
        < 2e-3
    )
    assert (
        _export(
            sdxl_lora_run, "--format", "lora-diffusers", "--checkpoint", "step-000001", "--out",
            str(tmp_path / "first"),
        )
        == 0
    )
    first = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    first.load_lora_weights(str(tmp_path / "first"))
    assert np.abs(_sample(first) - _sample(last)).max() > 1e-4


def test_weights_files_are_readable_by_whoever_can_read_the_runs_other_files(
    sdxl_lora_run: Path, tmp_path: Path
) -> None:
    """safetensors 0.8 creates its files 0600: a UI running as another user (a container's service account)
    could not read a run's weights. They get the mode of the run's other files, exports too."""
    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o044:
        pytest.skip(f"umask {umask:03o} keeps every new file from other users")
    assert _export(sdxl_lora_run, "--format", "lora-kohya", "--out", str(tmp_path / "k.safetensors")) == 0
    weights = [*sdxl_lora_run.rglob("*.safetensors"), tmp_path / "k.safetensors"]
    assert {p.parent.name for p in weights} >= {"unet", "lora", "step-000002", tmp_path.name}

    usual = stat.S_IMODE((sdxl_lora_run / "run.json").stat().st_mode)
    assert usual & 0o044
    assert {p.relative_to(p.parents[1]): oct(stat.S_IMODE(p.stat().st_mode)) for p in weights} == {
        p.relative_to(p.parents[1]): oct(usual) for p in weights
    }


def test_full_run_exports_a_single_file_and_a_pipeline(sd_full_run: Path, tmp_path: Path) -> None:
    folder = StableDiffusionPipeline.from_pretrained(sd_full_run / "pipeline")
    assert _export(sd_full_run, "--format", "single-file", "--out", str(tmp_path / "m.safetensors")) == 0
    pipe = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "m.safetensors"), config=str(sd_full_run / "pipeline"), local_files_only=True
    )
    assert np.abs(_sample(pipe) - _sample(folder)).max() < 2e-2  # fp16 weights
    assert _header(tmp_path / "m.safetensors")["modelspec.architecture"] == "stable-diffusion-v1"
    assert _export(sd_full_run, "--format", "diffusers", "--dtype", "fp32") == 0
    again = StableDiffusionPipeline.from_pretrained(sd_full_run / "exports" / "diffusers")
    assert np.abs(_sample(again) - _sample(folder)).max() < 1e-5


def test_bad_requests_are_refused_before_loading_and_leave_nothing(
    sd_full_run: Path, sdxl_lora_run: Path, tiny_cascade: Path, tmp_path: Path, capsys
) -> None:
    cases = [
        ((sdxl_lora_run, "--format", "single-file"), "needs --merge"),
        ((sd_full_run, "--format", "lora-kohya"), "no LoRA"),
        (
            (sd_full_run, "--format", "single-file", "--checkpoint", "step-000099"),
            "it has: step-000001, step-000002",
        ),
        ((tmp_path, "--format", "diffusers"), "is not a run folder"),
    ]
    for args, message in cases:
        assert _export(*args) == 2, args
        assert message in capsys.readouterr().err, args
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    assert _export(sd_full_run, "--format", "single-file", "--out", str(taken)) == 2
    assert "--overwrite" in capsys.readouterr().err and taken.read_bytes() == b"x"

    cascade = _train(tiny_cascade, tmp_path / "if-run", "--lora-rank", "2", "--cascade.stages", "base")
    assert _export(cascade, "--format", "lora-kohya") == 2
    assert "no such layout" in capsys.readouterr().err
    assert not (cascade / "exports").exists()


def test_an_unfinished_run_names_the_checkpoint_it_could_export(
    sd_full_run: Path, tmp_path: Path, capsys
) -> None:
    info = json.loads((sd_full_run / "run.json").read_text())
    broken = tmp_path / "unfinished"
    import shutil

    shutil.copytree(sd_full_run, broken, ignore=shutil.ignore_patterns("pipeline", "exports"))
    (broken / "run.json").write_text(json.dumps({**info, "status": "training"}))
    assert _export(broken, "--format", "single-file") == 2
    assert "--checkpoint step-000002" in capsys.readouterr().err
    assert not (broken / "exports").exists()  # a refused export leaves the run folder as it was
    assert _export(broken, "--format", "single-file", "--checkpoint", "step-000002") == 0
    assert (broken / "exports").is_dir()


def test_a_flux_lora_exports_in_the_layout_comfyui_reads(tmp_path_factory, tmp_path: Path) -> None:
    from tiny_transformers import build_tiny_flux

    model = build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")
    run = _train(model, tmp_path / "flux", "--lora-rank", "2", "--learning-rate", "1e-3")
    assert _export(run, "--format", "lora-kohya", "--out", str(tmp_path / "flux.safetensors")) == 0
    with safe_open(str(tmp_path / "flux.safetensors"), "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)
    assert header["modelspec.architecture"] == "flux-1-dev/lora" and header["dreambooth.class_noun"] == "dog"
    assert _export(run, "--format", "single-file", "--merge") == 2  # FLUX has no single-file layout here
