"""How fast the pocket world renders: images per second by batch size, subjects, captions.

Run: python bench/pocket_world_speed.py
"""

import time
from collections.abc import Callable

import numpy as np

from dreambooth.pocket.subjects import make_subject
from dreambooth.pocket.world import CONTEXTS, POSITIONS, VIEWS, caption, render, sample_dataset, sample_scenes


def per_second(n: int, fn: Callable[[], object], repeats: int = 5) -> float:
    """n divided by the fastest wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    render(sample_scenes(1, rng))
    print(f"first render (draws every placement and backdrop, once): {time.perf_counter() - start:.2f} s")
    for batch in (64, 256, 1024):
        scenes = sample_scenes(batch, rng)
        print(f"render, batch {batch:4d}: {per_second(batch, lambda s=scenes: render(s)):8.0f} images/s")
    rate = per_second(1024, lambda: sample_dataset(1024, seed=1), repeats=3)
    print(f"sample_dataset(1024): {rate:8.0f} captioned images/s")
    scenes = sample_scenes(1024, rng)
    print(
        f"caption with drops: {per_second(1024, lambda: [caption(s, rng) for s in scenes]):8.0f} captions/s"
    )
    subjects = iter(make_subject(seed) for seed in range(10**6))
    rate = per_second(64, lambda: render([next(subjects).scene("snow") for _ in range(64)]), repeats=3)
    print(f"subject scenes, a new subject each (paint drawn): {rate:8.0f} images/s")
    subject = make_subject(0)
    scenes = [subject.scene(c, p, v) for c in CONTEXTS for p in POSITIONS for v in VIEWS]
    render(scenes)
    rate = per_second(len(scenes), lambda: render(scenes))
    print(f"subject scenes, one subject (paint cached): {rate:8.0f} images/s")


if __name__ == "__main__":
    main()
