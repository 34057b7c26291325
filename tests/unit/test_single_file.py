"""Single-file checkpoints and kohya LoRAs: what the UIs load, read back by diffusers' own loaders."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from dreambooth.export.single_file import convert_to_ldm, export_lora_kohya, export_single_file
from dreambooth.models.sd import LORA_TARGETS, load_sd

from tiny_models import tiny_clip_tokenizer

NO_CHECKER = {"safety_checker": None, "requires_safety_checker": False}


def _load(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **NO_CHECKER)


def _reload(file: Path, config: Path) -> StableDiffusionPipeline:
    """What `load_sd` does: configs from a local diffusers folder, nothing from the Hub."""
    return StableDiffusionPipeline.from_single_file(
        str(file), config=str(config), local_files_only=True, dtype=torch.float32, **NO_CHECKER
    )


def _image(pipe: StableDiffusionPipeline) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    out = pipe("a photo of a dog", num_inference_steps=2, guidance_scale=3.0, generator=gen, output_type="pt")
    return out.images


def _assert_same_weights(pipe: StableDiffusionPipeline, other: StableDiffusionPipeline, cast=lambda t: t):
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key, value in mine.items():
            assert torch.equal(cast(value), theirs[key]), f"{name}.{key}"


@pytest.fixture(scope="module")
def tiny_sd2(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD with an SD 2.x-style text encoder (OpenCLIP's GELU) and v-prediction."""
    pipe = _load(tiny_sd)
    torch.manual_seed(1)
    config = CLIPTextConfig.from_dict({**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    text_encoder = CLIPTextModel(config)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    components = {**pipe.components, "text_encoder": text_encoder, "scheduler": scheduler}
    path = tmp_path_factory.mktemp("models") / "tiny-sd2"
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(path)
    return path


def test_fp32_export_reloads_with_identical_weights_and_image(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_sd)
    file = export_single_file(pipe, tmp_path / "tiny.safetensors", dtype=torch.float32)
    with safe_open(file, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == "32x32" and meta["dreambooth.writer"].startswith("dreambooth ")
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert vae_q.shape == (32, 32, 1, 1)  # LDM's VAE attention is 1x1 convolutions
    reloaded = _reload(file, tiny_sd)
    _assert_same_weights(pipe, reloaded)
    assert torch.equal(_image(reloaded), _image(pipe))


def test_fp16_is_the_default_and_halves_the_file(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_sd)
    half = export_single_file(pipe, tmp_path / "half.safetensors")
    full = export_single_file(pipe, tmp_path / "full.safetensors", dtype=torch.float32)
    with safe_open(half, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118 (no __iter__)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    _assert_same_weights(pipe, _reload(half, tiny_sd), cast=lambda t: t.half().float())


def test_the_projects_loader_reads_it_and_explains_a_missing_config(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import: set the variable and the constant it became.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    file = export_single_file(_load(tiny_sd), tmp_path / "tiny.safetensors", dtype=torch.float32)
    (stage,) = load_sd(str(file), single_file_config=str(tiny_sd))
    _assert_same_weights(_load(tiny_sd), stage.pipeline)
    with pytest.raises(ValueError, match="--model-config"):
        load_sd(str(file))


def test_sd2_open_clip_text_encoder_is_written_fused_and_reloads(tiny_sd2: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_sd2)
    file = export_single_file(pipe, tmp_path / "sd2.safetensors", dtype=torch.float32)
    with safe_open(file, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        in_proj = f.get_tensor("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert {"cond_stage_model.model.positional_embedding", "cond_stage_model.model.ln_final.weight"} <= keys
    assert in_proj.shape == (3 * 32, 32)  # q, k, v stacked, as nn.MultiheadAttention keeps them
    reloaded = _reload(file, tiny_sd2)
    _assert_same_weights(pipe, reloaded)
    assert torch.equal(_image(reloaded), _image(pipe))


# The configs of stable-diffusion-v1-5 and stable-diffusion-2-1 (diffusers defaults elsewhere).
SD15_UNET = {
    "sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD21_UNET = {
    **SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
    "sample_size": 512,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
CLIP_L = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
}
OPEN_CLIP_H = {  # SD 2.x's diffusers text encoder: OpenCLIP ViT-H up to its penultimate layer
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
    "hidden_act": "gelu",
}
# Names in the released SD 1.5 / 2.1 checkpoints (the UIs' fingerprints among them).
SD15_NAMES = {
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
}
SD21_NAMES = {
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize(
    ("unet", "text", "names", "model_type"),
    [(SD15_UNET, CLIP_L, SD15_NAMES, "v1"), (SD21_UNET, OPEN_CLIP_H, SD21_NAMES, "v2")],
    ids=["sd15", "sd21"],
)
def test_full_size_layouts_have_the_released_names_and_read_back(unet, text, names, model_type) -> None:
    """Real SD 1.5 / 2.1 shapes on the meta device: no memory, no download."""
    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text)
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**unet), "vae": AutoencoderKL(**SD_VAE)}
        parts["text_encoder"] = CLIPTextModel(text_config)
    parts |= {"tokenizer": tiny_clip_tokenizer(), "scheduler": DDPMScheduler(), "feature_extractor": None}
    pipe = StableDiffusionPipeline(**parts, **NO_CHECKER)
    ldm = convert_to_ldm(pipe)
    assert {k: tuple(ldm[k].shape) for k in names} == names
    assert infer_diffusers_model_type(ldm) == model_type and CHECKPOINT_KEY_NAMES["v1"] in ldm
    # diffusers' own LDM reader (what from_single_file runs) maps every name back to its parameter.
    assert _shapes(convert_ldm_unet_checkpoint(ldm, pipe.unet.config)) == _shapes(pipe.unet.state_dict())
    assert _shapes(convert_ldm_vae_checkpoint(ldm, pipe.vae.config)) == _shapes(pipe.vae.state_dict())
    if model_type == "v1":
        text_back = convert_ldm_clip_checkpoint(ldm)
    else:
        text_back = convert_open_clip_checkpoint(pipe.text_encoder, ldm)
    assert _shapes(text_back) == _shapes(pipe.text_encoder.state_dict())


def test_refuses_what_it_cannot_write(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_sd)
    with pytest.raises(ValueError, match=".safetensors"):
        export_single_file(pipe, tmp_path / "model.ckpt")
    unet = UNet2DConditionModel.from_config(pipe.unet.config, class_embed_type="timestep")  # not in SD 1/2
    other = StableDiffusionPipeline(**{**pipe.components, "unet": unet}, requires_safety_checker=False)
    with pytest.raises(NotImplementedError, match="class_embedding"):
        convert_to_ldm(other)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="merge_lora"):
        export_single_file(pipe, tmp_path / "model.safetensors")


@pytest.mark.parametrize("header", [None, "alpha", "rslora"], ids=["no-header", "alpha", "rslora"])
def test_kohya_lora_gives_the_same_image(tiny_sd: Path, tmp_path: Path, header: str | None) -> None:
    """No header: diffusers takes alpha = rank, so training must have used it. With one (an adapter
    config per part, as `save_lora_weights(..._lora_adapter_metadata=)` writes), any alpha, rsLoRA too."""
    pipe = _load(tiny_sd)
    torch.manual_seed(0)
    rslora = header == "rslora"
    common = {"use_rslora": rslora, "init_lora_weights": "gaussian"}
    # as models/lora.py
    unet_targets, text_targets = list(LORA_TARGETS["unet"]), list(LORA_TARGETS["text_encoder"])
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8 if header else 4, target_modules=unet_targets, **common),
        "text_encoder": LoraConfig(r=2, lora_alpha=1 if header else 2, target_modules=text_targets, **common),
    }
    for name, config in configs.items():
        getattr(pipe, name).add_adapter(config)
        for param_name, param in getattr(pipe, name).named_parameters():
            if "lora_B" in param_name:  # B starts at zero; make it what training would
                param.data.normal_(0, 0.3)
    trained = _image(pipe)
    peft_states = {n: get_peft_model_state_dict(getattr(pipe, n)) for n in configs}
    layers = {f"{n}_lora_layers": convert_state_dict_to_diffusers(state) for n, state in peft_states.items()}
    metadata = {f"{n}_lora_adapter_metadata": c.to_dict() for n, c in configs.items()} if header else {}
    StableDiffusionPipeline.save_lora_weights(tmp_path, safe_serialization=True, **layers, **metadata)
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"

    kohya_file = export_lora_kohya(diffusers_file, tmp_path / "kohya.safetensors", base=_load(tiny_sd))

    with safe_open(kohya_file, "pt") as f:
        meta, kohya = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    unet_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    te_name = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    assert kohya[f"{unet_name}.lora_down.weight"].shape == (4, 32)  # [r, in]
    assert kohya[f"{unet_name}.lora_up.weight"].shape == (32, 4)  # [out, r]
    for name, part in ((unet_name, "unet"), (te_name, "text_encoder")):  # kohya scales by alpha / r
        r, alpha = configs[part].r, configs[part].lora_alpha
        assert float(kohya[f"{name}.alpha"]) / r == pytest.approx(alpha / (r**0.5 if rslora else r))
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in kohya)
    assert meta["ss_v2"] == "False" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    images = {}
    for name, file in (("diffusers", diffusers_file), ("kohya", kohya_file)):
        fresh = _load(tiny_sd)
        fresh.load_lora_weights(str(file))
        images[name] = _image(fresh)
    torch.testing.assert_close(images["kohya"], images["diffusers"], rtol=0, atol=1e-6)
    torch.testing.assert_close(images["diffusers"], trained, rtol=0, atol=1e-6)
    assert not torch.allclose(trained, _image(_load(tiny_sd)), atol=1e-3)  # the LoRA does change the image


def test_kohya_header_stays_empty_without_a_base(tiny_sd: Path, tmp_path: Path) -> None:
    """AUTOMATIC1111 files any LoRA with a header under SD 1.x unless `ss_v2` says otherwise."""
    pipe = _load(tiny_sd)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, safe_serialization=True, unet_lora_layers=layers)
    out = export_lora_kohya(tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors")
    with safe_open(out, "pt") as f:
        assert not f.metadata() and all(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118
