"""Scorers for pocket-world images: what DreamBench measures, for this world.

Generated images are blurrier, noisier and less well placed than renders, and come at
32x32 (base stage) or 64x64 (super-resolution stage). Two methods cover the metrics.

A learned network (`_scorer_net.ScorerNet`, 0.4M parameters, trained on renders made to
look generated) reads every image resized to 32x32, so that a base sample and its
super-resolved version score alike:

* class and context heads: is the prompted object there, and the prompted context;
* a 64-d appearance embedding, the pocket analogue of DINO features, trained with a
  supervised contrastive loss to stay the same for one subject across contexts, positions
  and views and to differ between a subject and ordinary objects of its class. Subject
  fidelity (the paper's DINO) is `eval.metrics.mean_cross_cosine` of these embeddings;
  `is_subject` compares the cosine to the subject's prototype with a threshold calibrated
  on held-out subjects (the share of "a [class noun]" samples that are the subject
  measures language drift, like PRES); `diversity` is the mean pairwise cosine distance,
  and since the embedding ignores context and placement, it is the diversity of
  *appearances*, which is what collapses under language drift.

Exact image analysis scores fine detail (`detail_score`, 64x64 only): the subject's
badge is found by normalised cross-correlation (NCC) of the low-passed image with the
low-passed badge (both survive at 32x32), then the NCC of the high-pass residuals there
says whether the glyph strokes, which exist only at 64x64, are present and correct. A
bilinear 32 -> 64 upsampling has almost no high-pass energy that matches, so it scores far
lower than the true 64x64 image.

The committed weights' accuracy on held-out renders is in docs/pocket.md. Retrain them with
`dreambooth pocket train-scorer` (bitwise reproducible for a given thread count).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from dreambooth.eval.metrics import mean_self_cosine
from dreambooth.files import with_usual_permissions
from dreambooth.pocket._scorer_net import (
    TRAIN_STEPS,
    ScorerNet,
    augment,
    fit_net,
    gaussian_blur,
    images_to_tensor,
    to_input,
)
from dreambooth.pocket.subjects import BADGE_RADIUS, GLYPH_SIDE, Subject, make_subject
from dreambooth.pocket.world import (
    CLASSES,
    COLOURS,
    CONTEXTS,
    PATTERNS,
    POSITIONS,
    SIZE,
    SIZES,
    VIEWS,
    Scene,
    render,
    sample_scenes,
)

ImageBatch = np.ndarray | Tensor | Sequence[Image.Image]
"""uint8 [n, h, w, 3], float tensor [n, 3, h, w] in [0, 1], or RGB PIL images; h = w = 32 or 64."""
WEIGHTS = Path(__file__).parent / "weights" / "scorer.safetensors"
DETAIL_SIGMA = 1.0
"""Low-pass at 64x64 that keeps what a 32x32 image can carry; the rest is "fine detail"."""
CALIBRATION_SUBJECT_SEEDS = range(5_000, 5_060)
"""Held-out make_subject seeds on which the is_subject threshold is set."""


def as_tensor(images: ImageBatch) -> Tensor:
    """Any accepted image batch -> float [n, 3, h, w] in [0, 1].

    Raises:
        ValueError: on a wrong layout, dtype or value range.
    """
    if isinstance(images, Tensor):
        x = images.detach().float().cpu()
        if x.ndim != 4 or x.shape[1] != 3 or x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError(
                f"tensor images must be [n, 3, h, w] in [0, 1], got {tuple(x.shape)} in "
                f"[{x.min():.2f}, {x.max():.2f}]; map [-1, 1] model outputs with (x + 1) / 2"
            )
        return x
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"array images must be uint8 [n, h, w, 3], got {images.dtype} {images.shape}")
    return images_to_tensor(images)


@dataclass(frozen=True)
class Classification:
    """Predicted class and context of each image, with the probabilities behind them."""

    cls: list[str]
    context: list[str]
    cls_prob: Tensor  # [n, len(CLASSES)]
    context_prob: Tensor  # [n, len(CONTEXTS)]


@dataclass(frozen=True)
class _Template:
    """A subject's badge at 64x64 in one view, low- and high-passed, in a (2r+1)^2 window."""

    low: Tensor  # [3, k, k]
    high: Tensor  # [3, k, k]
    glyph_mask: Tensor  # [k, k], 1 on the disc that holds the glyph


def _ncc(image: Tensor, template: Tensor, mask: Tensor) -> Tensor:
    """Masked normalised cross-correlation at every valid offset.

    Args:
        image: [n, 3, H, W]. template: [3, k, k]. mask: [k, k] in {0, 1}.

    Returns:
        [n, H-k+1, W-k+1] in [-1, 1]; per-channel means are removed inside the mask.
    """
    count = mask.sum()
    t = (template - (template * mask).sum((1, 2), keepdim=True) / count) * mask
    num = F.conv2d(image, t[None])[:, 0]  # [n, H', W']
    box = mask.expand(3, 1, *mask.shape)
    s1, s2 = F.conv2d(image, box, groups=3), F.conv2d(image * image, box, groups=3)  # [n, 3, H', W']
    # Floor: a patch with less than 1% standard deviation is flat (and float32 cancels there).
    var = (s2 - s1 * s1 / count).sum(1).clamp_min(3 * count * 1e-4)
    return num / (t.norm() * var.sqrt())


class PocketScorer:
    """Class, context, identity and fine-detail scores for pocket images; see the module docstring.

    Also an `eval.embedders.ImageEmbedder` (`name`, `embed_images`), so the evaluation's
    DINO and PRES columns can be computed with it on pocket images.
    """

    name = "pocket-scorer"

    def __init__(self, net: ScorerNet) -> None:
        self.net = net.eval()
        self._prototypes: dict[Subject, Tensor] = {}
        self._looks: dict[str, Tensor] = {}
        self._templates: dict[Subject, list[_Template]] = {}

    @classmethod
    def load(cls, path: str | Path = WEIGHTS) -> PocketScorer:
        """The scorer with trained weights (loaded once per process and path)."""
        return _load(str(path))

    @property
    def threshold(self) -> float:
        """Cosine to a subject's prototype that an image of the subject must exceed (calibrated)."""
        return float(self.net.subject_threshold)

    @torch.no_grad()
    def _forward(self, images: ImageBatch) -> tuple[Tensor, Tensor, Tensor]:
        x = to_input(as_tensor(images))  # [n, 3, 32, 32]
        outs = [self.net(chunk) for chunk in x.split(256)]
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))  # type: ignore[return-value]

    def classify(self, images: ImageBatch) -> Classification:
        """Predict each image's object class and context."""
        cls_logits, ctx_logits, _ = self._forward(images)
        cls_prob, ctx_prob = cls_logits.softmax(1), ctx_logits.softmax(1)
        return Classification(
            [CLASSES[i] for i in cls_prob.argmax(1)],
            [list(CONTEXTS)[i] for i in ctx_prob.argmax(1)],
            cls_prob,
            ctx_prob,
        )

    def embed(self, images: ImageBatch) -> Tensor:
        """Appearance embeddings, L2-normalised, float32 [n, 64].

        Subject fidelity (the paper's DINO) is `eval.metrics.mean_cross_cosine` of the
        embeddings of generated images and of the subject's photos.
        """
        return self._forward(images)[2]

    embed_images = embed

    def prototype(self, subject: Subject) -> Tensor:
        """Mean embedding of the subject in every context, position and view, normalised, [64]."""
        if subject not in self._prototypes:
            scenes = [subject.scene(c, p, v) for c, p, v in product(CONTEXTS, POSITIONS, VIEWS)]
            self._prototypes[subject] = F.normalize(self.embed(render(scenes)).mean(0), dim=0)
        return self._prototypes[subject]

    def look_prototypes(self, cls: str) -> Tensor:
        """Prototypes of every ordinary look (colour x pattern) of a class, [24, 64]."""
        if cls not in self._looks:
            z = self.embed(render(_look_scenes(cls))).reshape(len(COLOURS) * len(PATTERNS), len(CONTEXTS), -1)
            self._looks[cls] = F.normalize(z.mean(1), dim=1)
        return self._looks[cls]

    def subject_match(self, images: ImageBatch, subject: Subject) -> tuple[Tensor, Tensor]:
        """Cosine of each image to the subject's prototype, and whether that beats every ordinary look.

        Returns:
            (cosine [n], beats_ordinary bool [n]).
        """
        z = self.embed(images)  # [n, 64]
        sim = z @ self.prototype(subject)
        return sim, sim > (z @ self.look_prototypes(subject.cls).T).amax(1)

    def is_subject(self, images: ImageBatch, subject: Subject) -> Tensor:
        """Whether each image shows the subject, bool [n]: nearer to the subject than to any
        ordinary look of its class, and nearer than the calibrated threshold. Their share among
        "a [class noun]" samples measures language drift."""
        sim, beats_ordinary = self.subject_match(images, subject)
        return beats_ordinary & (sim > self.threshold)

    def diversity(self, images: ImageBatch) -> float:
        """Mean cosine distance (1 - cos) over pairs of distinct images: appearance diversity.

        Raises:
            ValueError: with fewer than 2 images.
        """
        return 1.0 - mean_self_cosine(self.embed(images))

    def detail_score(self, images: ImageBatch, subject: Subject) -> Tensor:
        """How well the subject's 64x64-only detail (its glyph) is reproduced, [n] in [-1, 1].

        The badge is located by low-pass NCC over all offsets and both views; the score is
        the best high-pass NCC within one pixel of that location.

        Raises:
            ValueError: if the images are not 64x64 (there is no such detail below).
        """
        x = as_tensor(images)
        if x.shape[-2:] != (SIZE, SIZE):
            raise ValueError(f"detail_score needs {SIZE}x{SIZE} images, got {tuple(x.shape[-2:])}")
        low = gaussian_blur(x, torch.full((len(x),), DETAIL_SIGMA))
        found, detail = [], []  # per view: [n, H' * W'] NCC maps
        for t in self._badge_templates(subject):
            found.append(_ncc(low, t.low, torch.ones_like(t.glyph_mask)).flatten(1))
            high = _ncc(x - low, t.high, t.glyph_mask)[:, None]  # [n, 1, H', W']
            detail.append(F.max_pool2d(high, 3, stride=1, padding=1).flatten(1))  # best within 1 px
        where = torch.cat(found, 1).argmax(1)  # [n]: the view and offset where the badge is
        return torch.cat(detail, 1).gather(1, where[:, None])[:, 0]

    def _badge_templates(self, subject: Subject) -> list[_Template]:
        if subject not in self._templates:
            self._templates[subject] = [_badge_template(subject, view) for view in VIEWS]
        return self._templates[subject]


def _look_scenes(cls: str) -> list[Scene]:
    """Each ordinary look of a class in each context; size, position and view cycle with the context."""
    sizes, positions, views = list(SIZES), list(POSITIONS), list(VIEWS)
    return [
        Scene(cls, colour, pattern, sizes[i % 2], positions[i % 3], views[i * 2 // len(CONTEXTS)], context)
        for colour, pattern in product(COLOURS, PATTERNS)
        for i, context in enumerate(CONTEXTS)
    ]


def _badge_template(subject: Subject, view: str) -> _Template:
    """Cut the badge out of a render of the subject in `view`."""
    scene = subject.scene("pink_fabric", "centre", view)
    x = as_tensor(render([scene]))
    low = gaussian_blur(x, torch.full((1,), DETAIL_SIGMA))
    scale = scene.placement.scale
    r = int(np.ceil(BADGE_RADIUS * scale)) + 2  # the badge and its rim
    cx, cy = subject.badge_centre(scene.placement)
    x0, y0 = round(cx) - r, round(cy) - r
    window = (slice(None), slice(y0, y0 + 2 * r + 1), slice(x0, x0 + 2 * r + 1))
    yy, xx = torch.meshgrid(
        torch.arange(2 * r + 1) + y0 + 0.5, torch.arange(2 * r + 1) + x0 + 0.5, indexing="ij"
    )
    glyph_radius = (GLYPH_SIDE / np.sqrt(2) * scale) + 0.5  # the glyph square's half-diagonal
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= glyph_radius**2).float()
    return _Template(low[0][window], (x - low)[0][window], mask)


@cache
def _load(path: str) -> PocketScorer:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no scorer weights at {path}; train them with `dreambooth pocket train-scorer`"
        )
    net = ScorerNet()
    net.load_state_dict(load_file(path))
    return PocketScorer(net)


def _calibrate_threshold(scorer: PocketScorer, seed: int, recall: float = 0.99) -> float:
    """The cosine to a subject's prototype that a share `recall` of held-out subjects' "samples"
    (augmented renders in random scenes) exceed: the is_subject floor below which an image is
    not the subject even if no ordinary look is nearer (a failed sample, another object)."""
    rng, gen = np.random.default_rng([seed, 5]), torch.Generator().manual_seed(seed)
    cosines = []
    for subject_seed in CALIBRATION_SUBJECT_SEEDS:
        subject = make_subject(subject_seed)
        scenes = [subject.scene(s.context, s.position, s.view, s.variant) for s in sample_scenes(8, rng)]
        cosines.append(scorer.subject_match(augment(images_to_tensor(render(scenes)), gen), subject)[0])
    return float(torch.cat(cosines).quantile(1.0 - recall))


def heldout_accuracy(scorer: PocketScorer, n: int = 1000, seed: int = 123) -> dict[str, float]:
    """Class and context accuracy on fresh renders, at 64x64 and as bilinear 32 -> 64 upsamplings."""
    scenes = sample_scenes(n, np.random.default_rng([seed, 9]))
    x = as_tensor(render(scenes))
    blurry = F.interpolate(to_input(x), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    cls, context = np.array([s.cls for s in scenes]), np.array([s.context for s in scenes])
    out = {}
    for name, images in (("render64", x), ("up32to64", blurry)):
        pred = scorer.classify(images)
        out[f"class/{name}"] = float(np.mean(np.array(pred.cls) == cls))
        out[f"context/{name}"] = float(np.mean(np.array(pred.context) == context))
    return out


def train_scorer(out_path: str | Path = WEIGHTS, seed: int = 0, steps: int = TRAIN_STEPS) -> dict[str, float]:
    """Train, calibrate and save the scorer network; deterministic in `seed`.

    Returns:
        Held-out accuracies, the is_subject threshold and the training time in seconds.
    """
    start = time.perf_counter()
    net = fit_net(seed=seed, steps=steps)
    scorer = PocketScorer(net)
    net.subject_threshold.fill_(_calibrate_threshold(scorer, seed))
    metrics = {
        **heldout_accuracy(scorer),
        "threshold": scorer.threshold,
        "seconds": time.perf_counter() - start,
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        net.state_dict(),
        str(out_path),
        metadata={k: f"{v:.4f}" for k, v in metrics.items()} | {"seed": str(seed), "steps": str(steps)},
    )
    with_usual_permissions(Path(out_path))
    return metrics

