"""The pocket world's scorers behind the evaluation's interfaces, so the paper's table can be
filled for pocket models without DINO or CLIP weights (which no package ships). The columns are
named for these scorers (:data:`COLUMNS`): their values are not comparable with the paper's.

- pocket fidelity and PRES (DINO's role in the paper): the scorer's appearance embedding
  (identity of the object, ignoring the context and placement).
- pocket image-image and image-text (CLIP-I's and CLIP-T's roles): a joint image-text space
  built from the world's rules. An image is [appearance embedding, class probabilities, context
  probabilities]; a prompt is [0, one-hot of the class it names, one-hot of the context it
  names], so image-text cosine rewards the prompted class and context (and nothing else), and
  image-image cosine mixes identity and setting, as CLIP-I does.
- DIV (pocket appearance): 1 - cosine of appearance embeddings (LPIPS needs its own weights;
  appearance diversity is what collapses under language drift).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dreambooth.eval.scoring import Embedders
from dreambooth.pocket._scorer_net import EMBED_DIM
from dreambooth.pocket.scorers import PocketScorer
from dreambooth.pocket.world import CLASSES, CONTEXTS

COLUMNS = {
    "dino": "pocket fidelity", "clip_i": "pocket image-image", "clip_t": "pocket image-text",
    "pres": "PRES (pocket fidelity)", "div": "DIV (pocket appearance)",
    "class_div": "DIV class (pocket appearance)",
}  # fmt: skip
"""The table's column names for values these scorers produce: not the paper's DINO, CLIP or LPIPS."""


def prompt_one_hots(prompt: str) -> tuple[Tensor, Tensor]:
    """One-hot vectors of the class and the context a prompt names (zeros where it names none)."""
    words = prompt.lower().split()
    cls = torch.tensor([float(c in words) for c in CLASSES])
    context = torch.tensor([float(prompt.lower().endswith(phrase)) for phrase in CONTEXTS.values()])
    return cls, context


class PocketImageText:
    """CLIP's role for pocket images: one space for images and prompts."""

    name = "pocket-scorer (class, context, appearance)"

    def __init__(self, scorer: PocketScorer) -> None:
        self.scorer = scorer

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        classes = self.scorer.classify(list(images))
        joint = torch.cat([self.scorer.embed(list(images)), classes.cls_prob, classes.context_prob], dim=1)
        return F.normalize(joint, dim=1)  # [n, 64 + classes + contexts]

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        rows = []
        for text in texts:
            cls, context = prompt_one_hots(text)
            rows.append(torch.cat([torch.zeros(EMBED_DIM), cls, context]))
        return F.normalize(torch.stack(rows), dim=1)


class PocketDistance:
    """Perceptual distance for DIV: 1 - cosine of appearance embeddings."""

    name = "pocket-scorer appearance distance"

    def __init__(self, scorer: PocketScorer) -> None:
        self.scorer = scorer

    def pairwise_distances(self, images: Sequence[Image.Image]) -> Tensor:
        embeddings = self.scorer.embed(list(images))
        return 1 - embeddings @ embeddings.T


def load_pocket_embedders(device: str = "cpu") -> Embedders:
    """The pocket scorers as the evaluation's embedders (they run on CPU; `device` is accepted for the
    interface)."""
    scorer = PocketScorer.load()
    return Embedders(
        subject=scorer, image_text=PocketImageText(scorer), perceptual=PocketDistance(scorer), columns=COLUMNS
    )
