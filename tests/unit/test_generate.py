"""Sampling: per-image seeds, and cascades that share stages sample them once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dreambooth.generate import generate, generate_cascades
from dreambooth.models.deepfloyd_if import load_if


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_cascades_sharing_a_base_match_separate_runs_and_sample_it_once(tiny_cascade: Path) -> None:
    base, sr = (s.pipeline for s in load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2")))
    _, other_sr = (s.pipeline for s in load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2")))
    other_sr.unet.conv_in.weight.data.add_(0.5)  # a different SR stage after the same base
    prompts, seeds = ["a cube", "a ball", "a cube"], [0, 1, 2]
    kwargs = dict(steps=2, guidance=[4.0, 4.0], batch_size=2)

    separately = {
        name: generate(c, prompts, seeds, **kwargs)
        for name, c in (("a", [base, sr]), ("b", [base, other_sr]))
    }
    base_calls: list = []
    original = type(base).__call__
    type(base).__call__ = _counting(original, base_calls)
    try:
        together = generate_cascades({"a": [base, sr], "b": [base, other_sr]}, prompts, seeds, **kwargs)
    finally:
        type(base).__call__ = original

    assert len(base_calls) == 2  # one call per batch of 2, shared by both cascades
    for name in ("a", "b"):
        np.testing.assert_array_equal(_pixels(together[name]), _pixels(separately[name]))
    assert not np.array_equal(_pixels(together["a"]), _pixels(together["b"]))


def test_an_image_depends_on_its_seed_not_its_batch(tiny_cascade: Path) -> None:
    pipelines = [s.pipeline for s in load_if(str(tiny_cascade / "stage_1"), str(tiny_cascade / "stage_2"))]
    alone = generate(pipelines, ["a cube"], [5], steps=2, guidance=[4.0, 4.0])
    batched = generate(pipelines, ["a ball", "a cube"], [4, 5], steps=2, guidance=[4.0, 4.0], batch_size=2)
    # uint8; batched matmuls may round differently
    np.testing.assert_allclose(_pixels(alone)[0], _pixels(batched)[1], atol=2)


def _counting(function, calls: list):
    def counted(self, *args, **kwargs):
        calls.append(1)
        return function(self, *args, **kwargs)

    return counted
