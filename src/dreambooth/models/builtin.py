"""Models that ship inside the package, by name."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_FILE = "builtin.json"
"""Beside a built-in model's weights: its class nouns and embedders entry point (data, so that the
models package imports nothing from the packages that made the model)."""


@dataclass(frozen=True)
class BuiltinModel:
    path: Path
    """Its cascade folder (stage_1/, stage_2/) or pipeline folder."""
    embedders: str | None = None
    """'module:function' that builds evaluation embedders for the model's world (its own scorers)."""
    class_nouns: tuple[str, ...] = ()
    """The class nouns its pretraining taught it (empty: any noun)."""


def load_builtin_model(path: Path) -> BuiltinModel:
    """The built-in model whose weights are in `path`, described by its `builtin.json`."""
    described = json.loads((path / BUILTIN_FILE).read_text(encoding="utf-8"))
    return BuiltinModel(
        path=path, embedders=described.get("embedders"), class_nouns=tuple(described.get("class_nouns", ()))
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # The pocket cascade pretrained by `dreambooth pocket pretrain` on the procedural world.
    "pocket": load_builtin_model(Path(__file__).resolve().parents[1] / "pocket" / "weights" / "cascade"),
}


def builtin_embedders(source: str, device: str):
    """The built-in model `source`'s own evaluation embedders, or None if it has none."""
    model = BUILTIN_MODELS.get(source)
    if model is None or model.embedders is None:
        return None
    module, function = model.embedders.split(":")
    return getattr(importlib.import_module(module), function)(device=device)


def unknown_class_noun(source: str, class_noun: str) -> str | None:
    """Why built-in model `source` cannot serve `class_noun`, or None if it can (or is not built in)."""
    model = BUILTIN_MODELS.get(source)
    if model is None or not model.class_nouns or class_noun in model.class_nouns:
        return None
    return (
        f"--class-noun {class_noun!r}: the built-in {source!r} model only knows "
        f"{', '.join(model.class_nouns)}, so its "
        f"class images and prior for {class_noun!r} are meaningless. Use one of those nouns, or give a "
        "real model (--model <hub id or folder>) for real photos."
    )
