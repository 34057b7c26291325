"""Local model folders: the snapshot a hub cache entry points at, and which weight files to read."""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_WEIGHT_FILE = re.compile(r"^[^.]+?(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)$")
"""A component's weight file: `model.safetensors`, `diffusion_pytorch_model.fp16.safetensors`,
`model.fp16-00001-of-00002.safetensors`, ..."""


def folder_variant(folder: Path) -> str | None:
    """The variant a local pipeline folder must be read with: the one of the components that ship only
    variant weight files (which `from_pretrained` without `variant` cannot find), else None.

    Raises:
        ValueError: if such components ship different variants (pass --variant).
    """
    only_variant: dict[str, set[str]] = {}
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        matches = [m for f in component.iterdir() if (m := _WEIGHT_FILE.match(f.name))]
        if matches and all(m["variant"] for m in matches):
            only_variant[component.name] = {m["variant"] for m in matches}
    variants = set().union(*only_variant.values())
    if len(variants) > 1:
        raise ValueError(
            f"model folder {str(folder)!r}: components {sorted(only_variant)} ship only variant weights, "
            f"of several kinds ({sorted(variants)}): pass --variant to say which to read"
        )
    if variants:
        (variant,) = variants
        logger.info("%s: reading its %s weights (%s ship no others)", folder, variant, sorted(only_variant))
        return variant
    return None


def hub_cache_snapshot(folder: Path) -> Path | None:
    """The model a hub cache entry (`models--org--name/`, as `hf download` leaves it) holds: the snapshot
    `refs/main` names, else its only snapshot; None for a folder that is not such an entry.

    Raises:
        ValueError: if it holds several snapshots and no `refs/main`, naming them.
    """
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    main = folder / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text(encoding="utf-8").strip()).is_dir():
        return snapshots / main.read_text(encoding="utf-8").strip()
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"model folder {str(folder)!r} is a hub cache entry with {len(found)} snapshots and no refs/main: "
        f"pass one of them ({', '.join(str(p) for p in found) or 'none found'})"
    )
