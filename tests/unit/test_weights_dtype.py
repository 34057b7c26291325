"""Which dtype weights load in: a LoRA run under bf16 keeps its frozen base in bf16, adapters train in
fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from dreambooth.config import LoraConfig, ModelConfig, RunConfig, TrainConfig
from dreambooth.models.loading import load_stages, resolve_source
from dreambooth.models.lora import add_lora


def test_weights_dtype_follows_the_method_and_precision() -> None:
    lora, bf16 = LoraConfig(rank=4), TrainConfig(mixed_precision="bf16")
    assert RunConfig(lora=lora, train=bf16).weights_dtype == "bf16"
    assert RunConfig(train=bf16).weights_dtype == "fp32"  # full fine-tuning: fp32 master weights
    assert RunConfig(lora=lora).weights_dtype == "fp32"
    assert RunConfig(lora=lora, train=TrainConfig(mixed_precision="fp16")).weights_dtype == "fp32"
    assert RunConfig(model=ModelConfig(dtype="fp16")).weights_dtype == "fp16"


def test_a_bf16_lora_run_loads_its_base_in_bf16(tiny_sdxl: Path) -> None:
    cfg = RunConfig(
        model=ModelConfig(source=str(tiny_sdxl)), lora=LoraConfig(rank=2),
        train=TrainConfig(mixed_precision="bf16"),
    )
    (stage,) = load_stages(resolve_source(cfg.model), cfg)
    assert {p.dtype for p in stage.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in stage.text_encoders["text_encoder_2"].parameters()} == {torch.bfloat16}
    add_lora(stage, cfg.lora, {"unet": stage.denoiser})
    assert any(p.requires_grad for p in stage.denoiser.parameters())
