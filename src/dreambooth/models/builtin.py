"""Models that ship inside the package, by name."""

from pathlib import Path

BUILTIN_MODELS: dict[str, Path] = {
    "pocket": Path(__file__).resolve().parents[1] / "pocket" / "weights" / "cascade",
}
"""The pocket cascade pretrained by `dreambooth pocket pretrain` on the procedural world."""
