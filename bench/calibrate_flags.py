"""Calibrate the failure-mode flags on pocket-world renders, where the truth of every case is known.

For held-out pocket subjects (seeds the scorers never saw), each prompt "a sks <class> <context>"
gets 4 generated-like images (renders through the scorer's generation augmentation) of one case:

- faithful: the subject in the prompted context, never in the pose of a photo taken there;
- bleed 25/50/75/100%: the same, its paint mixed that far towards the context's mean colour
  (entangled from 50% up);
- identity loss: a plain member of the class in one world colour that is not the context's own;
- context missing: the subject in another context;
- copy: 1-4 of the 4 images redraw a photo (same context, pose and backdrop), the rest are new poses.

The pretrained row is 4 ordinary class members per context prompt. Every prompt is scored by
`score_subject` with the pocket scorers, as `dreambooth eval` scores a pocket model. Each flag's
threshold is swept over its measure on the fit subjects (seeds 0-7) and the one of highest F1 is
printed (ties: the middle of the tied range); precision and recall are measured at the defaults of
`options.Thresholds` on the test subjects (seeds 100-107). About 2 minutes on one core:

    OMP_NUM_THREADS=1 python bench/calibrate_flags.py     # --details: each measure's range per case
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from dreambooth.eval import diagnostics
from dreambooth.eval.embedders import EmbeddingCache
from dreambooth.eval.scoring import Embedders, Samples, SubjectPhotos, score_subject
from dreambooth.options import Thresholds
from dreambooth.pocket._backdrops import BACKDROP_PAINTERS
from dreambooth.pocket._scorer_net import augment, images_to_tensor
from dreambooth.pocket.embedders import load_pocket_embedders
from dreambooth.pocket.subjects import Subject, make_subject, photo_scenes
from dreambooth.pocket.world import (
    COLOURS,
    CONTEXTS,
    N_VARIANTS,
    PATTERNS,
    POSITIONS,
    SIZES,
    VIEWS,
    Scene,
    render,
)

IDENTIFIER = "sks"
IMAGES = 4
"""Images per prompt, as `dreambooth eval` samples them."""
STRENGTH = 0.5
"""Generation-like augmentation (1.0: the strongest the scorer was trained on)."""
BLEEDS = (0.25, 0.5, 0.75, 1.0)
ENTANGLED_FROM = 0.5
"""A subject counts as entangled when its paint moved at least this far towards the context's colour."""
OWN_COLOURS = {
    "snow": {"white"}, "grass": {"green"}, "jungle": {"green"}, "pink_fabric": {"pink"},
    "under_water": {"blue"},
}  # fmt: skip
"""World colours a context is painted with: identity loss to these is the context's colour, so not a
negative."""
FLAGS = (diagnostics.CONTEXT_MISSING, diagnostics.ENTANGLEMENT, diagnostics.OVERFITTING)
FIELDS = {
    diagnostics.CONTEXT_MISSING: "context_margin",
    diagnostics.ENTANGLEMENT: "entanglement_pull",
    diagnostics.OVERFITTING: "overfit_similarity",
}


@dataclass(frozen=True)
class Case:
    """One prompt's images and the truth of each flag for them."""

    kind: str
    context: str
    images: list[Image.Image]
    truth: dict[str, bool]


def context_colour(context: str) -> np.ndarray:
    """Mean RGB of a context's backdrop over its variants."""
    paint = BACKDROP_PAINTERS[context]
    return np.mean([paint(np.random.default_rng(k), 64).mean((0, 1)) for k in range(N_VARIANTS)], 0)


def bled(subject: Subject, context: str, amount: float) -> Subject:
    """The subject with every paint mixed `amount` of the way towards the context's mean colour."""
    target = context_colour(context)

    def mix(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(int(round(v)) for v in (1 - amount) * np.asarray(rgb, np.float32) + amount * target)

    colours = (mix(subject.colours[0]), mix(subject.colours[1]))
    return replace(subject, colours=colours, badge=mix(subject.badge), ink=mix(subject.ink))


def generated(scenes: list[Scene], gen: torch.Generator) -> list[Image.Image]:
    """Renders made to look like samples of a small diffusion model (32x32)."""
    x = augment(images_to_tensor(render(scenes)), gen, STRENGTH)  # [n, 3, 32, 32]
    return [Image.fromarray((im.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)) for im in x]


def new_poses(
    subject: Subject, context: str, taken: set[tuple], n: int, rng: np.random.Generator
) -> list[Scene]:
    """n scenes of the subject in `context`, none in the (context, position, view) of a photo."""
    poses = [(p, v) for p in POSITIONS for v in VIEWS if (context, p, v) not in taken]
    picks = rng.choice(len(poses), size=n)
    return [subject.scene(context, *poses[i], int(rng.integers(N_VARIANTS))) for i in picks]


def pretrained_images(
    cls: str, context: str, rng: np.random.Generator, gen: torch.Generator
) -> list[Image.Image]:
    """What a pretrained model draws for "a <cls> <context>": ordinary members of the class, anything but the
    context random."""
    scenes = [
        Scene(cls, str(rng.choice(list(COLOURS))), str(rng.choice(PATTERNS)), str(rng.choice(list(SIZES))),
              str(rng.choice(list(POSITIONS))), str(rng.choice(list(VIEWS))), context,
              int(rng.integers(N_VARIANTS)))
        for _ in range(IMAGES)
    ]  # fmt: skip
    return generated(scenes, gen)


def subject_cases(
    subject: Subject, photos: list[Scene], rng: np.random.Generator, gen: torch.Generator
) -> list[Case]:
    """Every labelled case of one subject (see the module docstring)."""
    taken = {(s.context, s.position, s.view) for s in photos}
    truth = dict.fromkeys(FLAGS, False)
    cases = []
    for context in CONTEXTS:
        faithful = new_poses(subject, context, taken, IMAGES, rng)
        cases.append(Case("faithful", context, generated(faithful, gen), truth))
        for amount in BLEEDS:
            paint = bled(subject, context, amount)
            scenes = [replace(s, subject=paint) for s in new_poses(subject, context, taken, IMAGES, rng)]
            entangled = {**truth, diagnostics.ENTANGLEMENT: amount >= ENTANGLED_FROM}
            cases.append(Case(f"bleed {amount:.0%}", context, generated(scenes, gen), entangled))
        colour = str(rng.choice([c for c in COLOURS if c not in OWN_COLOURS.get(context, ())]))
        scenes = [Scene(subject.cls, colour, "plain", subject.size, s.position, s.view, context, s.variant)
                  for s in new_poses(subject, context, taken, IMAGES, rng)]  # fmt: skip
        cases.append(Case("identity loss", context, generated(scenes, gen), truth))
        other = str(rng.choice([c for c in CONTEXTS if c != context]))
        missing = {**truth, diagnostics.CONTEXT_MISSING: True}
        elsewhere = generated(new_poses(subject, other, taken, IMAGES, rng), gen)
        cases.append(Case("context missing", context, elsewhere, missing))
    for photo in photos:
        copies = int(rng.integers(1, IMAGES + 1))
        scenes = [photo] * copies + new_poses(subject, photo.context, taken, IMAGES - copies, rng)
        copied = {**truth, diagnostics.OVERFITTING: True}
        cases.append(Case("copy", photo.context, generated(scenes, gen), copied))
    return cases


def measure(
    subject: Subject, photos: list[Scene], cases: list[Case], embedders: Embedders, rng: np.random.Generator,
    gen: torch.Generator,
) -> list[dict[str, float]]:
    """Each case's value of each flag's measure, by `score_subject` with thresholds that flag every value.

    A measure the checks do not report (a pull of 0 or below, a colour gap under
    `entanglement_min_gap`, a CLIP-T drop of 0 or below) is -inf: below every threshold.
    """
    drawn = {
        f"a {subject.cls} {phrase}": pretrained_images(subject.cls, c, rng, gen)
        for c, phrase in CONTEXTS.items()
    }
    pretrained = Samples("Pretrained", drawn)
    everything = Thresholds(context_margin=0.0, entanglement_pull=1e-9, overfit_similarity=0.0)
    photo_set = SubjectPhotos(subject.name, subject.cls, [Image.fromarray(im) for im in render(photos)])
    cache, values = EmbeddingCache(), [dict.fromkeys(FLAGS, -math.inf) for _ in cases]
    for kind in dict.fromkeys(c.kind for c in cases):  # one prompt per context: one call per kind
        mine = {
            f"a {IDENTIFIER} {subject.cls} {CONTEXTS[c.context]}": i for i, c in enumerate(cases)
            if c.kind == kind
        }
        samples = Samples("DreamBooth", {p: cases[i].images for p, i in mine.items()}, identifier=IDENTIFIER)
        result = score_subject(
            photo_set, [samples], embedders, pretrained=pretrained, thresholds=everything, cache=cache
        )
        for scores in result.prompts[len(CONTEXTS) :]:  # the pretrained row's prompts come first
            values[mine[scores.prompt]].update({f.kind: f.value for f in scores.flags})
    return values


def labelled(
    seeds: range, rng: np.random.Generator, gen: torch.Generator, embedders: Embedders
) -> tuple[list[Case], list[dict]]:
    """Every case of the subjects of `seeds`, and its measures."""
    cases, values = [], []
    for seed in seeds:
        subject = make_subject(seed)
        photos = photo_scenes(subject, 5, seed)
        mine = subject_cases(subject, photos, rng, gen)
        cases += mine
        values += measure(subject, photos, mine, embedders, rng, gen)
    return cases, values


GRIDS = {
    diagnostics.CONTEXT_MISSING: np.round(np.arange(0.0, 0.5001, 0.005), 3),
    diagnostics.ENTANGLEMENT: np.round(np.arange(0.05, 1.0001, 0.01), 2),
    diagnostics.OVERFITTING: np.round(np.arange(0.5, 1.0001, 0.005), 3),
}
"""Candidate thresholds of each flag, in its measure's units."""


def arrays(cases: list[Case], values: list[dict], flag: str) -> tuple[np.ndarray, np.ndarray]:
    """One flag's measures and truths."""
    return np.array([v[flag] for v in values]), np.array([c.truth[flag] for c in cases])


def precision_recall(values: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Precision, recall and F1 of flagging `values > threshold`, the rule of the `diagnostics.check_*`."""
    flagged = values > threshold
    tp, fp, fn = (flagged & truth).sum(), (flagged & ~truth).sum(), (~flagged & truth).sum()
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r, 2 * p * r / (p + r) if p + r else 0.0


def best_threshold(values: np.ndarray, truth: np.ndarray, grid: np.ndarray) -> float:
    """The grid threshold of highest F1; among ties, the middle of the first run of tied grid points."""
    f1 = np.array([precision_recall(values, truth, t)[2] for t in grid])
    best = np.flatnonzero(np.isclose(f1, f1.max()))
    run = best[: np.argmax(np.diff(best, append=best[-1] + 2) > 1) + 1]
    return float(grid[run[len(run) // 2]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fit-subjects", type=int, default=8, help="subjects that choose the thresholds (seeds 0..)"
    )
    parser.add_argument(
        "--test-subjects", type=int, default=8,
        help="subjects that measure precision and recall (seeds 100..)",
    )
    parser.add_argument("--seed", type=int, default=0, help="draws of poses, colours and augmentation")
    parser.add_argument("--details", action="store_true", help="also print each measure's range per case")
    args = parser.parse_args()
    start = time.perf_counter()
    embedders = load_pocket_embedders()
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    fit = labelled(range(args.fit_subjects), rng, gen, embedders)
    test = labelled(range(100, 100 + args.test_subjects), rng, gen, embedders)
    defaults = Thresholds()
    print(
        f"{len(fit[0])} + {len(test[0])} prompts of {IMAGES} images (fit + test), "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(
        f"{'flag':<16} {'threshold':<19} {'fit: best F1':>12} {'default':>8} {'test: pos/neg':>14} "
        f"{'precision':>9} {'recall':>6}"
    )
    for flag in FLAGS:
        field, default = FIELDS[flag], getattr(defaults, FIELDS[flag])
        chosen = best_threshold(*arrays(*fit, flag), GRIDS[flag])
        values, truth = arrays(*test, flag)
        p, r, _ = precision_recall(values, truth, default)
        counts = f"{truth.sum()}/{(~truth).sum()}"
        print(f"{flag:<16} {field:<19} {chosen:>12.3f} {default:>8.3f} {counts:>14} {p:>9.2f} {r:>6.2f}")
    cases, values = test
    kinds = list(dict.fromkeys(c.kind for c in cases))
    print(
        "\nshare of the test prompts flagged at the defaults:\n"
        + f"{'case':<16}"
        + "".join(f"{f:>17}" for f in FLAGS)
    )
    for kind in kinds:
        rows = [v for c, v in zip(cases, values) if c.kind == kind]
        rates = [np.mean([v[f] > getattr(defaults, FIELDS[f]) for v in rows]) for f in FLAGS]
        print(f"{kind:<16}" + "".join(f"{rate:>17.2f}" for rate in rates))
    for flag in FLAGS if args.details else ():
        print(f"\n{flag}, test prompts: min / median / max of the measure where the check reports one")
        for kind in kinds:
            every = np.array([v[flag] for c, v in zip(cases, values) if c.kind == kind])
            v = every[np.isfinite(every)]
            if len(v):
                print(
                    f"  {kind:<16} {v.min():7.3f} {np.median(v):7.3f} {v.max():7.3f}  ({len(v)} of "
                    f"{len(every)})"
                )


if __name__ == "__main__":
    main()
