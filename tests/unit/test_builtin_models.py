"""Built-in models are described by data beside their weights (models/ imports nothing above it)."""

from __future__ import annotations

from dreambooth.models.builtin import BUILTIN_MODELS, builtin_embedders, unknown_class_noun
from dreambooth.pocket.world import CLASSES


def test_the_pocket_model_knows_the_pocket_world_class_nouns() -> None:
    assert BUILTIN_MODELS["pocket"].class_nouns == CLASSES
    assert unknown_class_noun("pocket", "ball") is None
    assert "only knows ball, cube" in unknown_class_noun("pocket", "dog")
    assert unknown_class_noun("some/hub-model", "dog") is None


def test_the_pocket_model_brings_its_own_embedders() -> None:
    embedders = builtin_embedders("pocket", "cpu")
    assert embedders is not None and embedders.subject.name.startswith("pocket")
    assert builtin_embedders("some/hub-model", "cpu") is None
