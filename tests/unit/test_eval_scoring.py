"""Scoring orchestration with embedders of known output: pairing, averaging and flags by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.eval import diagnostics
from dreambooth.eval.diagnostics import Thresholds
from dreambooth.eval.embedders import EmbeddingCache
from dreambooth.eval.scoring import REAL_LABEL, Embedders, Samples, SubjectPhotos, score_subject, summarise

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)
SNOW, BEACH = "a qwv toy in the snow", "a qwv toy on the beach"
TEXTS = {
    "a toy in the snow": [1.0, 0.0, 0.0],
    "a toy on the beach": [0.0, 0.0, 1.0],
    "a blue toy": [0.0, 0.0, 1.0],
}


def solid(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _mean_colour(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.tensor(np.array([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) / 255 for im in images]))


class ColourEmbedder:
    """Embeds an image as its mean RGB and a text by a fixed table, so cosines are hand-computable."""

    name = "mean-colour"

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.images = 0

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        self.images += len(images)
        return _mean_colour(images)  # [n, 3]

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.texts += texts
        return torch.tensor([TEXTS[t] for t in texts])


class ColourDistance:
    name = "colour-l1"

    def pairwise_distances(self, images: Sequence[Image.Image]) -> torch.Tensor:
        colours = _mean_colour(images)
        return torch.cdist(colours, colours, p=1)


@pytest.fixture
def embedders() -> Embedders:
    colour = ColourEmbedder()
    return Embedders(subject=colour, image_text=colour, perceptual=ColourDistance())


def finetuned(class_samples: tuple[Image.Image, ...] = ()) -> Samples:
    return Samples(
        "DreamBooth",
        {SNOW: [solid(RED), solid(RED)], BEACH: [solid(YELLOW), solid(BLUE)]},
        identifier="qwv",
        class_samples=class_samples,
    )


def test_scores_match_a_hand_computation(embedders: Embedders) -> None:
    subject = SubjectPhotos("toy", "toy", [solid(RED), solid(GREEN)])
    result = score_subject(subject, [finetuned((solid(RED), solid(BLUE)))], embedders)
    real, model = result.rows
    assert real.label == REAL_LABEL and real.dino == pytest.approx(0.0)  # red vs green; self-pairs excluded
    snow, beach = result.prompts
    # snow: red x {red, green} twice -> (1 + 0 + 1 + 0) / 4; beach: yellow -> s, s; blue -> 0, 0
    s = math.sqrt(0.5)
    assert (snow.dino, beach.dino) == pytest.approx((0.5, 2 * s / 4))
    assert (snow.clip_t, beach.clip_t) == pytest.approx((1.0, 0.5))
    assert (snow.div, beach.div) == pytest.approx((0.0, 3.0))
    assert model.dino == model.clip_i == pytest.approx((0.5 * 2 + 2 * s / 4 * 2) / 4)
    assert model.clip_t == pytest.approx(0.75) and model.div == pytest.approx(1.5)
    assert model.pres == pytest.approx(0.25)  # red -> 1, 0; blue -> 0, 0
    assert model.class_div == pytest.approx(2.0)


def test_clip_t_sees_prompts_without_the_identifier(embedders: Embedders) -> None:
    score_subject(SubjectPhotos("toy", "toy", [solid(RED)]), [finetuned()], embedders)
    assert embedders.image_text.texts == ["a toy in the snow", "a toy on the beach"]


def test_subjects_weigh_the_same_whatever_their_image_counts(embedders: Embedders) -> None:
    one = score_subject(SubjectPhotos("a", "toy", [solid(RED), solid(GREEN)]), [finetuned()], embedders)
    two = score_subject(
        SubjectPhotos("b", "toy", [solid(RED), solid(RED)]),
        [Samples("DreamBooth", {SNOW: [solid(BLUE)]}, identifier="qwv")],
        embedders,
    )
    table = {row.label: row for row in summarise([one, two], embedders).rows}
    assert table[REAL_LABEL].dino == pytest.approx((0.0 + 1.0) / 2)
    assert table["DreamBooth"].dino == pytest.approx((one.rows[1].dino + 0.0) / 2)
    assert table["DreamBooth"].div == pytest.approx(1.5)  # subject b has no pair of images: no DIV
    assert table["DreamBooth"].pres is None


def test_flags_context_missing_and_overfitting(embedders: Embedders) -> None:
    pretrained = Samples(
        "Pretrained", {"a toy in the snow": [solid(WHITE)], "a toy on the beach": [solid(BLUE)]}
    )
    subject = SubjectPhotos("toy", "toy", [solid(RED), solid(GREEN)], photo_names=["00.jpg", "01.jpg"])
    result = score_subject(subject, [finetuned()], embedders, pretrained=pretrained)
    assert [row.label for row in result.rows] == [REAL_LABEL, "Pretrained", "DreamBooth"]
    by_prompt = {(p.model, p.prompt): p for p in result.prompts}
    snow, beach = by_prompt["DreamBooth", SNOW], by_prompt["DreamBooth", BEACH]
    assert [f.kind for f in snow.flags] == [diagnostics.OVERFITTING]  # red is photo 00.jpg itself
    assert "00.jpg" in snow.flags[0].evidence
    # beach: CLIP-T 0.5 against the pretrained model's 1.0 on "a toy on the beach"
    # blue: the beach's colour
    assert [f.kind for f in beach.flags] == [diagnostics.CONTEXT_MISSING, diagnostics.ENTANGLEMENT]
    assert beach.flags[0].value == pytest.approx(0.5)
    assert beach.flags[0].explanation == diagnostics.EXPLANATIONS[diagnostics.CONTEXT_MISSING]
    assert set(beach.checked) == set(diagnostics.EXPLANATIONS)
    assert by_prompt["Pretrained", "a toy in the snow"].checked == ()


def test_without_pretrained_images_only_overfitting_is_checked(embedders: Embedders) -> None:
    result = score_subject(SubjectPhotos("toy", "toy", [solid(GREEN)]), [finetuned()], embedders)
    assert all(p.checked == (diagnostics.OVERFITTING,) for p in result.prompts)
    assert result.rows[0].dino is None  # one photo: no real-vs-real pair


def _entangled(generated: tuple[int, int, int], prompt: str = SNOW) -> diagnostics.Flag | None:
    colour = ColourEmbedder()
    embedders = Embedders(colour, colour, ColourDistance())
    pretrained = Samples("Pretrained", {"a toy in the snow": [solid(BLUE)] * 2})
    model = Samples("DreamBooth", {prompt: [solid(generated)] * 2}, identifier="qwv")
    thresholds = Thresholds(overfit_similarity=1.0, context_margin=1.0)
    result = score_subject(
        SubjectPhotos("toy", "toy", [solid(RED)]), [model], embedders, pretrained=pretrained,
        thresholds=thresholds,
    )
    flags = result.prompts[-1].flags
    return flags[0] if flags else None


def test_entanglement_flags_a_subject_that_took_the_contexts_colour() -> None:
    flag = _entangled(BLUE)
    assert flag is not None and flag.kind == diagnostics.ENTANGLEMENT and flag.value == pytest.approx(1.0)
    assert _entangled(RED) is None


def test_entanglement_is_not_checked_on_property_prompts(embedders: Embedders) -> None:
    pretrained = Samples("Pretrained", {"a blue toy": [solid(BLUE)]})
    model = Samples("DreamBooth", {"a blue qwv toy": [solid(BLUE)]}, identifier="qwv")
    result = score_subject(
        SubjectPhotos("toy", "toy", [solid(RED)]), [model], embedders, pretrained=pretrained
    )
    assert diagnostics.ENTANGLEMENT not in result.prompts[-1].checked
    assert result.prompts[-1].flags == ()


def test_cache_keeps_photo_and_pretrained_embeddings_across_calls(embedders: Embedders) -> None:
    subject = SubjectPhotos("toy", "toy", [solid(RED), solid(GREEN)])
    pretrained = Samples("Pretrained", {"a toy in the snow": [solid(WHITE)]}, class_samples=[solid(BLUE)])
    cache = EmbeddingCache()
    first = score_subject(subject, [finetuned()], embedders, pretrained=pretrained, cache=cache)
    seen = embedders.subject.images
    second = score_subject(subject, [finetuned()], embedders, pretrained=pretrained, cache=cache)
    # only the evaluated model's 4 images are embedded again, by both the subject and image-text roles
    assert embedders.subject.images - seen == 2 * 4
    assert first.rows == second.rows


def test_a_prompt_without_images_is_an_error(embedders: Embedders) -> None:
    model = Samples("DreamBooth", {SNOW: []}, identifier="qwv")
    with pytest.raises(ValueError, match="has no images"):
        score_subject(SubjectPhotos("toy", "toy", [solid(RED)]), [model], embedders)
