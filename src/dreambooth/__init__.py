"""DreamBooth: personalise text-to-image diffusion models from a few photos of a subject.

The public API, imported on first use (so that `import dreambooth` and the CLI's `--help` stay
fast). The recipe and the sampler live in modules of the same name, so they are imported from
those modules (a lazy package attribute cannot shadow a submodule reliably):

    from pathlib import Path
    from dreambooth import load_config, load_model
    from dreambooth.finetune import finetune
    from dreambooth.generate import generate
    layout = finetune(load_config(Path("run.toml")))
"""

from __future__ import annotations

import importlib
import logging as _logging

__version__ = "0.1.0"

# bitsandbytes logs a warning at import on every CPU without its optional `kernels` package,
# about a 4-bit kernel this tool never uses.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# transformers warns that image processors fall back to PIL without torchvision; PIL is what we
# want (torchvision has no CPU build here, and our evaluation does its own preprocessing).
_logging.getLogger("transformers.utils.import_utils").setLevel(_logging.ERROR)

_EXPORTS = {
    "RunConfig": "dreambooth.config",
    "load_config": "dreambooth.config",
    "validate": "dreambooth.config",
    "load_model": "dreambooth.generate",
    "choose_identifier": "dreambooth.identifier",
    "check_identifier": "dreambooth.identifier",
    "load_images": "dreambooth.data.images",
    "RunLayout": "dreambooth.layout",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dreambooth' has no attribute {name!r}")
