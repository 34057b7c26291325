"""Models that ship inside the package, by name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    path: Path
    """Its cascade folder (stage_1/, stage_2/) or pipeline folder."""
    embedders: str | None = None
    """'module:function' that builds evaluation embedders for the model's world (its own scorers)."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # The pocket cascade pretrained by `dreambooth pocket pretrain` on the procedural world.
    "pocket": BuiltinModel(
        path=Path(__file__).resolve().parents[1] / "pocket" / "weights" / "cascade",
        embedders="dreambooth.pocket.embedders:load_embedders",
    ),
}


def builtin_embedders(source: str, device: str):
    """The built-in model `source`'s own evaluation embedders, or None if it has none."""
    model = BUILTIN_MODELS.get(source)
    if model is None or model.embedders is None:
        return None
    module, function = model.embedders.split(":")
    return getattr(importlib.import_module(module), function)(device=device)
