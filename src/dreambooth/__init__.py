"""DreamBooth: personalise text-to-image diffusion models from a few photos of a subject."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs a warning at import on every CPU without its optional `kernels` package,
# about a 4-bit kernel this tool never uses.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# transformers warns that image processors fall back to PIL without torchvision; PIL is what we
# want (torchvision has no CPU build here, and our evaluation does its own preprocessing).
_logging.getLogger("transformers.utils.import_utils").setLevel(_logging.ERROR)
