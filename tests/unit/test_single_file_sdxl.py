"""SDXL single files and kohya LoRAs, read back by diffusers' own loaders (SGM layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth.export.single_file import convert_to_ldm, export_lora_kohya, export_single_file

from tiny_models import tiny_clip_tokenizer

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# What the run's export passes (modelspec.export_metadata): the exporter keeps its own layout fields.
CALLER = {
    "modelspec.architecture": "stable-diffusion-v1",
    "modelspec.implementation": "diffusers",
    "modelspec.title": "DreamBooth sks dog",
    "modelspec.trigger_phrase": "sks dog",
    "modelspec.resolution": "1024x1024",
    "dreambooth.identifier": "sks",
    "dreambooth.class_noun": "dog",
}


def _load(folder: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)


def _reload(file: Path, config: Path) -> StableDiffusionXLPipeline:
    """Configs from a local diffusers folder, nothing from the Hub."""
    return StableDiffusionXLPipeline.from_single_file(
        str(file), config=str(config), local_files_only=True, dtype=torch.float32
    )


def _image(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    out = pipe("a photo of a dog", num_inference_steps=2, guidance_scale=3.0, generator=gen, output_type="pt")
    return out.images  # [1, 3, 64, 64]


def _assert_same_weights(
    pipe: StableDiffusionXLPipeline, other: StableDiffusionXLPipeline, cast=lambda t: t
) -> None:
    for name in PARTS:
        mine, theirs = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key, value in mine.items():
            assert torch.equal(cast(value), theirs[key]), f"{name}.{key}"


def test_fp32_export_reloads_with_identical_weights_and_image(tiny_sdxl: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_sdxl)
    file = export_single_file(pipe, tmp_path / "xl.safetensors", dtype=torch.float32, metadata=CALLER)
    with safe_open(file, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
        in_proj = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert {k: meta[k] for k in ("modelspec.title", "modelspec.trigger_phrase", "modelspec.resolution")} == {
        "modelspec.title": "DreamBooth sks dog", "modelspec.trigger_phrase": "sks dog",
        "modelspec.resolution": "1024x1024",
    }
    assert meta["dreambooth.identifier"] == "sks" and meta["dreambooth.class_noun"] == "dog"
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert {k.split(".")[2] for k in keys if k.startswith("conditioner.")} == {"0", "1"}
    assert {
        "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
        # 2-layer transformer
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # upsampler after the attention
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
    } <= keys
    assert projection.shape == (48, 24)  # [hidden, projection]: OpenCLIP computes pooled @ text_projection
    assert torch.equal(projection, pipe.text_encoder_2.text_projection.weight.T)
    assert in_proj.shape == (3 * 48, 48)
    reloaded = _reload(file, tiny_sdxl)
    _assert_same_weights(pipe, reloaded)
    # Same weights, bit for bit; the image can differ in the last bits only because CPU GEMM kernels
    # round differently for differently aligned buffers (mmap'd safetensors offsets).
    torch.testing.assert_close(_image(reloaded), _image(pipe), rtol=0, atol=1e-5)


def test_fp16_export_reloads_within_half_precision(tiny_sdxl: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_sdxl)
    half = export_single_file(pipe, tmp_path / "half.safetensors")
    with safe_open(half, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118 (no __iter__)
    reloaded = _reload(half, tiny_sdxl)
    _assert_same_weights(pipe, reloaded, cast=lambda t: t.half().float())
    torch.testing.assert_close(_image(reloaded), _image(pipe), rtol=0, atol=5e-3)


# stabilityai/stable-diffusion-xl-base-1.0's configs (diffusers defaults elsewhere).
SDXL_UNET = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE = {
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
    "sample_size": 1024, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.13025, "force_upcast": True,
}
CLIP_L = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "hidden_act": "quick_gelu", "projection_dim": 768,
}
OPEN_CLIP_BIGG = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "hidden_act": "gelu", "projection_dim": 1280,
}
# Names and shapes in sd_xl_base_1.0.safetensors (the UIs' fingerprints among them).
SDXL_NAMES = {
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
}
# kohya sd-scripts' names for SDXL LoRA modules, by diffusers module.
KOHYA_UNET_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k":
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
    "mid_block.attentions.0.transformer_blocks.3.attn1.to_v":
        "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_v",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0":
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_out_0",
    "up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q":
        "lora_unet_output_blocks_3_1_transformer_blocks_1_attn1_to_q",
}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def full_size_sdxl() -> StableDiffusionXLPipeline:
    """SDXL base's real shapes on the meta device: no memory, no download."""
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**SDXL_UNET), "vae": AutoencoderKL(**SDXL_VAE)}
        parts["text_encoder"] = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **CLIP_L)
        )
        config_2 = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **OPEN_CLIP_BIGG)
        parts["text_encoder_2"] = CLIPTextModelWithProjection(config_2)
    tokenizers = {"tokenizer": tiny_clip_tokenizer(0), "tokenizer_2": tiny_clip_tokenizer(1, pad_token="!")}
    return StableDiffusionXLPipeline(
        **parts, **tokenizers, scheduler=EulerDiscreteScheduler(), add_watermarker=False
    )


def test_full_size_layout_has_the_released_names_and_reads_back(
    full_size_sdxl: StableDiffusionXLPipeline,
) -> None:
    pipe = full_size_sdxl
    ldm = convert_to_ldm(pipe)
    assert {k: tuple(ldm[k].shape) for k in SDXL_NAMES} == SDXL_NAMES
    assert infer_diffusers_model_type(ldm) == "xl_base"
    # diffusers' own LDM readers (what from_single_file runs) map every name back to its parameter.
    assert _shapes(convert_ldm_unet_checkpoint(ldm, pipe.unet.config)) == _shapes(pipe.unet.state_dict())
    assert _shapes(convert_ldm_vae_checkpoint(ldm, pipe.vae.config)) == _shapes(pipe.vae.state_dict())
    assert _shapes(convert_ldm_clip_checkpoint(ldm)) == _shapes(pipe.text_encoder.state_dict())
    text_2 = convert_open_clip_checkpoint(pipe.text_encoder_2, ldm, prefix="conditioner.embedders.1.model.")
    assert _shapes(text_2) == _shapes(pipe.text_encoder_2.state_dict())


def test_full_size_kohya_names_are_sd_scripts_and_diffusers_maps_them_back(
    full_size_sdxl: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    unet = full_size_sdxl.unet
    modules = dict(unet.named_modules())
    state = {}
    for module in KOHYA_UNET_NAMES:
        out_features, in_features = modules[module].weight.shape
        state[f"unet.{module}.lora_A.weight"] = torch.zeros(1, in_features)
        state[f"unet.{module}.lora_B.weight"] = torch.zeros(out_features, 1)
    save_file(state, tmp_path / "lora.safetensors")
    kohya_file = export_lora_kohya(
        tmp_path / "lora.safetensors", tmp_path / "kohya.safetensors", base=full_size_sdxl
    )
    with safe_open(kohya_file, "pt") as f:
        kohya = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    assert {k.split(".")[0] for k in kohya} == set(KOHYA_UNET_NAMES.values())
    # What load_lora_weights runs on a kohya file: SGM blocks -> diffusers blocks, kohya -> diffusers -> PEFT.
    back, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(kohya, unet.config))
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in back.items()})
    assert {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith("lora_A.weight")} == set(
        KOHYA_UNET_NAMES
    )


def _lora_pipe(tiny_sdxl: Path) -> tuple[StableDiffusionXLPipeline, dict[str, LoraConfig]]:
    pipe = _load(tiny_sdxl)
    torch.manual_seed(0)
    common = {"init_lora_weights": "gaussian"}
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, **common),
        "text_encoder": LoraConfig(r=2, lora_alpha=1, target_modules=CLIP_TARGETS, **common),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=2, target_modules=CLIP_TARGETS, **common),
    }
    for name, config in configs.items():
        getattr(pipe, name).add_adapter(config)
        for param_name, param in getattr(pipe, name).named_parameters():
            if "lora_B" in param_name:  # B starts at zero; make it what training would
                param.data.normal_(0, 0.3)
    return pipe, configs


def test_kohya_lora_gives_the_same_image(tiny_sdxl: Path, tmp_path: Path) -> None:
    pipe, configs = _lora_pipe(tiny_sdxl)
    trained = _image(pipe)
    layers = {
        f"{n}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, n)))
        for n in configs
    }
    metadata = {f"{n}_lora_adapter_metadata": c.to_dict() for n, c in configs.items()}
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, safe_serialization=True, **layers, **metadata)
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"

    caller = {**CALLER, "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    kohya_file = export_lora_kohya(
        diffusers_file, tmp_path / "kohya.safetensors", base=_load(tiny_sdxl), metadata=caller
    )

    with safe_open(kohya_file, "pt") as f:
        meta, kohya = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    names = {k.split(".")[0] for k in kohya}
    n_modules = {n: len(get_peft_model_state_dict(getattr(pipe, n))) // 2 for n in configs}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    # nothing dropped
    assert {n: sum(k.startswith(p) for k in names) for n, p in prefixes.items()} == n_modules
    unet_name = "lora_unet_output_blocks_1_1_transformer_blocks_1_attn2_to_out_0"  # up_blocks.0.attentions.1
    assert kohya[f"{unet_name}.lora_down.weight"].shape == (4, 64)  # [r, in]
    assert kohya[f"{unet_name}.lora_up.weight"].shape == (64, 4)  # [out, r]
    for name, part in (  # kohya scales by alpha / r
        (unet_name, "unet"),
        ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "text_encoder"),
        ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "text_encoder_2"),
    ):
        assert float(kohya[f"{name}.alpha"]) == configs[part].lora_alpha
    # the second transformer layer
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in names
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    # AUTOMATIC1111: SDXL
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"  # the most common rank and alpha
    assert meta["modelspec.trigger_phrase"] == "sks dog" and meta["dreambooth.identifier"] == "sks"
    images = {}
    for name, file in (("diffusers", diffusers_file), ("kohya", kohya_file)):
        fresh = _load(tiny_sdxl)
        fresh.load_lora_weights(str(file))
        images[name] = _image(fresh)
    torch.testing.assert_close(images["kohya"], images["diffusers"], rtol=0, atol=1e-6)
    torch.testing.assert_close(images["diffusers"], trained, rtol=0, atol=1e-5)
    assert not torch.allclose(trained, _image(_load(tiny_sdxl)), atol=1e-3)  # the LoRA does change the image


def test_refuses_parameters_without_an_sgm_name(tiny_sdxl: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_sdxl)
    unet = UNet2DConditionModel.from_config(pipe.unet.config, class_embed_type="timestep")  # not in SDXL
    other = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet})
    with pytest.raises(NotImplementedError, match=r"class_embedding\.linear_1\.weight"):
        export_single_file(other, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    # A LoRA on a module SDXL's layout has no name for (`linear_1` also hits the nameable
    # time and added embeddings) is refused whole, not written without it.
    unet.add_adapter(LoraConfig(r=2, target_modules=["linear_1"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, safe_serialization=True, unet_lora_layers=layers)
    with pytest.raises(NotImplementedError, match=r"\['class_embedding\.linear_1'\]"):
        export_lora_kohya(
            tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors", base=other
        )
    # SDXL names need the UNet's blocks; a header, the architecture
    with pytest.raises(ValueError, match="base="):
        export_lora_kohya(
            tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors", metadata=CALLER
        )
    with pytest.raises(ValueError, match="str to str"):
        export_single_file(pipe, tmp_path / "model.safetensors", metadata={"dreambooth.steps": 400})
