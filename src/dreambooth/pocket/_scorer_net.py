"""The pocket scorer's network and how it is trained.

A small CNN (0.39M parameters) reads 32x32 images and has three heads: object class,
context, and a 64-d L2-normalised appearance embedding. The class and context heads are
trained with cross-entropy; the embedding with the supervised contrastive loss (Khosla et
al. 2020, Eq. 2) over *appearance identities*: an ordinary (class, colour, pattern) or one
random subject, each drawn twice per batch in different contexts, positions, sizes and views.
So the embedding learns what stays when the scene changes (what DINO features do on real
photos) and ignores where and in front of what the object is.

Renders are made to look generated before the network sees them (`augment`): blur, random
affine jitter, down-up resampling, colour jitter, blotchy and white noise. Every image,
whatever its size, enters through `to_input` (antialiased resize to 32x32), the same
function at training and scoring time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreambooth.pocket.subjects import make_subject
from dreambooth.pocket.world import (
    CLASSES,
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

INPUT_SIZE = 32
EMBED_DIM = 64
TRAIN_SUBJECT_SEEDS = range(10_000, 1_000_000)
"""make_subject seeds the embedding is trained on; smaller seeds are held out."""
TRAIN_STEPS = 1500
"""Default training length (batches of 64)."""


def _trunk(widths: tuple[int, int, int]) -> nn.Sequential:
    """VGG-style features: two 3x3 convs per stage, 32 -> 16 -> 8, then global average pooling."""
    layers: list[nn.Module] = []
    cin = 3
    for stage, width in enumerate(widths):
        for c in (cin, width):
            layers += [
                nn.Conv2d(c, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.MaxPool2d(2) if stage < len(widths) - 1 else nn.AdaptiveAvgPool2d(1))
        cin = width
    return nn.Sequential(*layers, nn.Flatten())


class ScorerNet(nn.Module):
    """Two trunks: object (class and embedding heads) and context (context head).

    The context is in the colours of most of the image and is learnt in a few steps; sharing
    one trunk, that shortcut kept the class head at chance for hundreds of steps. A separate,
    smaller context trunk leaves the object trunk to learn shapes and paint.
    """

    def __init__(
        self,
        object_widths: tuple[int, int, int] = (32, 64, 128),
        context_widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.object_trunk, self.context_trunk = _trunk(object_widths), _trunk(context_widths)
        c = object_widths[-1]
        self.cls_head = nn.Linear(c, len(CLASSES))
        self.embed_head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, EMBED_DIM))
        self.context_head = nn.Linear(context_widths[-1], len(CONTEXTS))
        # Cosine to a subject's prototype above which an image is that subject (set by calibration).
        self.register_buffer("subject_threshold", torch.tensor(0.5))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [n, 3, 32, 32] in [0, 1] -> (class logits [n, 6], context logits [n, 10], embedding [n, 64])."""
        x = (x - 0.5) / 0.25
        h = self.object_trunk(x)  # [n, c]
        return (
            self.cls_head(h),
            self.context_head(self.context_trunk(x)),
            F.normalize(self.embed_head(h), dim=1),
        )


def to_input(x: Tensor) -> Tensor:
    """Resize float images [n, 3, h, w] to the network's [n, 3, 32, 32] (antialiased)."""
    if x.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return x
    return F.interpolate(
        x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False
    )


def _around(n: int, centre: float, spread: float, gen: torch.Generator) -> Tensor:
    """n values uniform in [centre - spread, centre + spread]."""
    return centre + spread * (2 * torch.rand(n, generator=gen) - 1)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur with one sigma per image: x [n, c, h, w], sigma [n] (0 keeps the image)."""
    n, c, h, w = x.shape
    t = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # [n, 7]
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, 7]
    y = F.conv2d(
        F.pad(x.reshape(1, n * c, h, w), (3, 3, 0, 0), mode="replicate"), k[:, None, None], groups=n * c
    )
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: Tensor, gen: torch.Generator, strength: float = 1.0) -> Tensor:
    """Make clean renders look like samples of a small diffusion model.

    Args:
        x: renders [n, 3, h, w] in [0, 1], h = w = 64 or 32.
        gen: the randomness.
        strength: scales every perturbation; 0 only resizes (training ramps it up).

    Returns:
        Augmented network inputs [n, 3, 32, 32] in [0, 1].
    """
    n, k = x.shape[0], strength
    x = gaussian_blur(x, _around(n, 0.75, 0.75, gen) * k * (torch.rand(n, generator=gen) < 0.6))
    x = to_input(x)
    # Objects in samples are never exactly at the world's positions and sizes.
    scale, angle = _around(n, 1.0, 0.12 * k, gen), _around(n, 0.0, 0.2 * k, gen)
    shift = _around(2 * n, 0.0, 0.15 * k, gen).reshape(n, 2)
    theta = torch.stack(
        [
            torch.stack([scale * angle.cos(), -scale * angle.sin(), shift[:, 0]], 1),
            torch.stack([scale * angle.sin(), scale * angle.cos(), shift[:, 1]], 1),
        ],
        1,
    )  # [n, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    down_up = torch.rand(n, generator=gen) < 0.3 * k
    small = F.interpolate(x, size=(INPUT_SIZE // 2, INPUT_SIZE // 2), mode="bilinear", antialias=True)
    x = torch.where(down_up[:, None, None, None], F.interpolate(small, size=x.shape[-2:], mode="bilinear"), x)
    # Colour: contrast about the image mean, saturation, per-channel gain, brightness.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + _around(n, 1.0, 0.25 * k, gen)[:, None, None, None] * (x - mean)
    grey = x.mean(dim=1, keepdim=True)
    x = grey + _around(n, 0.95, 0.35 * k, gen)[:, None, None, None] * (x - grey)
    gain, offset = _around(3 * n, 1.0, 0.1 * k, gen).reshape(n, 3, 1, 1), _around(n, 0.0, 0.08 * k, gen)
    x = x * gain + offset[:, None, None, None]
    blotches = F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=x.shape[-2:], mode="bilinear")
    x = x + _around(n, 0.03, 0.03, gen)[:, None, None, None] * k * blotches
    x = x + _around(n, 0.04, 0.04, gen)[:, None, None, None] * k * torch.randn(x.shape, generator=gen)
    return x.clamp(0.0, 1.0)


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out): z [b, d] unit rows, labels [b]."""
    eye = torch.eye(len(z), dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))  # [b, b]
    log_prob = (logits - logits.logsumexp(dim=1, keepdim=True)).masked_fill(eye, 0.0)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    return -((log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)).mean()


def identity_batch(
    rng: np.random.Generator, n_ordinary: int, n_subject: int, views: int
) -> tuple[list[Scene], Tensor]:
    """Scenes of n_ordinary + n_subject appearance identities, each drawn `views` times.

    Returns:
        (scenes, identity label per scene [len(scenes)]), identities in consecutive runs.
    """

    def pick(options: dict | tuple) -> str:
        return str(rng.choice(list(options)))

    scenes = []
    for _ in range(n_ordinary):
        cls, colour, pattern = pick(CLASSES), pick(COLOURS), pick(PATTERNS)
        scenes += [
            Scene(
                cls,
                colour,
                pattern,
                pick(SIZES),
                pick(POSITIONS),
                pick(VIEWS),
                pick(CONTEXTS),
                int(rng.integers(N_VARIANTS)),
            )
            for _ in range(views)
        ]
    for _ in range(n_subject):
        subject = make_subject(int(rng.integers(TRAIN_SUBJECT_SEEDS.start, TRAIN_SUBJECT_SEEDS.stop)))
        scenes += [
            subject.scene(pick(CONTEXTS), pick(POSITIONS), pick(VIEWS), int(rng.integers(N_VARIANTS)))
            for _ in range(views)
        ]
    return scenes, torch.arange(n_ordinary + n_subject).repeat_interleave(views)


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [n, h, w, 3] -> float [n, 3, h, w] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def fit_net(seed: int = 0, steps: int = TRAIN_STEPS, lr: float = 2e-3, log_every: int = 100) -> ScorerNet:
    """Train a ScorerNet from scratch on freshly rendered, augmented batches of 64 images.

    Augmentation strength ramps from 0 to 1 over the first quarter of the steps: with full
    strength from the start, the class head stays at chance for hundreds of steps.

    Deterministic in `seed` (world sampling, augmentation and initialisation).
    """
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng([seed, 3]), torch.Generator().manual_seed(seed)
    net = ScorerNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    cls_index, ctx_index = {c: i for i, c in enumerate(CLASSES)}, {c: i for i, c in enumerate(CONTEXTS)}
    net.train()
    for step in range(steps):
        scenes, identity = identity_batch(rng, n_ordinary=20, n_subject=12, views=2)
        strength = min(1.0, 4 * step / steps)
        x = augment(images_to_tensor(render(scenes)), gen, strength)  # [64, 3, 32, 32]
        cls_logits, ctx_logits, z = net(x)
        losses = {
            "class": F.cross_entropy(cls_logits, torch.tensor([cls_index[s.cls] for s in scenes])),
            "context": F.cross_entropy(ctx_logits, torch.tensor([ctx_index[s.context] for s in scenes])),
            "supcon": supcon_loss(z, identity),
        }
        opt.zero_grad(set_to_none=True)
        # Shapes are learnt slower than colours (which give the embedding most of its loss
        # within 50 steps); weighting the class term x3 halves the steps it stays at chance.
        (3.0 * losses["class"] + losses["context"] + losses["supcon"]).backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d} " + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items()), flush=True)
    return net.eval()
