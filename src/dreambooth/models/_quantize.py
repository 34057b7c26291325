"""Quantising a frozen transformer at load, so that a LoRA on a large flow model fits one card.

`--quantize nf4` and `int8` go through diffusers' `BitsAndBytesConfig` (bitsandbytes), `fp8` through
diffusers' `TorchAoConfig` with torchao's float8 weight-only config. The quantised weights stay
frozen: only LoRA adapters train on top of them (QLoRA, Dettmers et al. 2023). The checks run
before any weights load, so that a missing library or device is reported with the other option
problems.
"""

from __future__ import annotations

import importlib.util

import torch

METHODS = ("nf4", "int8", "fp8")
COMPUTE_DTYPE = torch.bfloat16
"""Dtype 4-bit layers compute in (FLUX.1 and SD3 ship in bf16; QLoRA's setting)."""
FP8_CAPABILITY = (8, 9)
"""CUDA compute capability from which GPUs have fp8 arithmetic (Ada, Hopper and newer)."""


def quantize_problems(method: str) -> list[str]:
    """What stops `--quantize method` on this machine (library or device), each naming the flag; empty if
    nothing."""
    if method == "none":
        return []
    if method in ("nf4", "int8"):
        if importlib.util.find_spec("bitsandbytes") is None:
            return [f"--quantize {method} needs bitsandbytes: pip install bitsandbytes"]
        if not torch.cuda.is_available():
            return [
                f"--quantize {method}: diffusers quantises with bitsandbytes on a CUDA GPU only, and none is "
                "visible here; drop --quantize to train unquantised"
            ]
        return []
    if method == "fp8":
        if importlib.util.find_spec("torchao") is None:
            return ["--quantize fp8 needs torchao (>= 0.15): pip install torchao"]
        if not torch.cuda.is_available():
            return [
                "--quantize fp8: torchao's fp8 weights need a CUDA GPU, and none is visible here; drop "
                "--quantize to train unquantised"
            ]
        capability = torch.cuda.get_device_capability()
        if capability < FP8_CAPABILITY:
            return [f"--quantize fp8 needs a GPU with fp8 support (compute capability 8.9+), found "
                    f"{torch.cuda.get_device_name()} ({capability[0]}.{capability[1]}); use --quantize nf4 "
                    "or int8"]
        return []
    return [f"--quantize {method!r} is not one of none, {', '.join(METHODS)}"]


def quantization_config(method: str):
    """diffusers' quantization config for `--quantize method` ('nf4', 'int8' or 'fp8').

    Raises:
        ValueError: `quantize_problems` names a problem (missing library, no suitable GPU, unknown method).
    """
    if problems := quantize_problems(method):
        raise ValueError(problems[0])
    if method == "fp8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig

        return TorchAoConfig(Float8WeightOnlyConfig())
    from diffusers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE_DTYPE
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized_transformer(
    cls, source: str, single_file_config: str | None, method: str, *, revision, variant, dtype: torch.dtype
):
    """`cls` (a diffusers transformer class) loaded from a pipeline folder, hub id or single file with
    its linear layers quantised by `method`; the rest of its weights in `dtype`.

    Raises:
        ValueError: this machine cannot quantise with `method` (names the flag and the fix).
    """
    from pathlib import Path

    from dreambooth.models._latent import SINGLE_FILE_SUFFIXES

    config = quantization_config(method)  # raises first if this machine cannot quantise
    if Path(source).suffix in SINGLE_FILE_SUFFIXES:
        return cls.from_single_file(
            source, config=single_file_config, subfolder="transformer", quantization_config=config,
            torch_dtype=dtype, local_files_only=True,
        )
    return cls.from_pretrained(source, subfolder="transformer", revision=revision, variant=variant,
                               quantization_config=config, torch_dtype=dtype)
