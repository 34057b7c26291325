"""Preprocessing, the DINO/CLIP embedders on tiny random models saved and reloaded offline, caching,
and scoring end to end with them."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from dreambooth.eval.embedders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipEmbedder,
    DinoEmbedder,
    EmbeddingCache,
    centre_crop_box,
    clip_preprocess,
    dino_preprocess,
    load_clip,
    load_dino,
    resize_shorter_side,
    to_pixel_values,
)
from dreambooth.eval.scoring import Samples, SubjectPhotos, load_paper_embedders, score_subject

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=224, patch_size=16, **TINY), add_pooling_layer=False)
    path = tmp_path_factory.mktemp("dino")
    model.save_pretrained(path)
    return path


def _save_tokenizer(path: Path) -> CLIPTokenizer:
    letters = list(string.ascii_lowercase)
    vocab = {
        t: i
        for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])
    }
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=77
    )
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip")
    tokenizer = _save_tokenizer(path)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = {**TINY, **special, "vocab_size": len(tokenizer), "max_position_embeddings": 77}
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=text, vision_config={**TINY, "image_size": 224, "patch_size": 32}, projection_dim=16
    )
    CLIPModel(config).save_pretrained(path)
    return path


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_documented_preprocessing_constants() -> None:
    dino, clip = dino_preprocess(224), clip_preprocess(224)
    assert (dino.resize, dino.crop, dino.mean, dino.std) == (
        256,
        224,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    assert (clip.resize, clip.crop) == (224, 224)
    assert clip.mean == (0.48145466, 0.4578275, 0.40821073) and clip.std == (
        0.26862954,
        0.26130258,
        0.27577711,
    )
    assert clip_preprocess(336).resize == 336 and dino_preprocess(448).resize == 512


def test_resize_keeps_aspect_with_bicubic_on_the_shorter_side() -> None:
    image = _image(300, 200)
    resized = resize_shorter_side(image, 256)
    assert resized.size == (384, 256)
    assert resize_shorter_side(_image(200, 301), 256).size == (256, 385)  # int() truncates the long side
    bicubic = np.asarray(image.resize((384, 256), Image.Resampling.BICUBIC))
    bilinear = np.asarray(image.resize((384, 256), Image.Resampling.BILINEAR))
    assert np.array_equal(np.asarray(resized), bicubic) and not np.array_equal(bicubic, bilinear)


def test_centre_crop_box() -> None:
    assert centre_crop_box(384, 256, 224) == (80, 16, 304, 240)
    assert centre_crop_box(225, 224, 224) == (0, 0, 224, 224)  # round-half-even like torchvision


def test_pixel_values_are_the_normalised_centre_crop() -> None:
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 200))  # a blue strip the crop must cut away
    pixels = to_pixel_values([image, image.convert("L")], dino_preprocess())
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[0].mean(dim=(1, 2)), expected)
    clip = to_pixel_values([image], clip_preprocess())
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(clip[0].mean(dim=(1, 2)), expected)


def test_dino_embedding_is_the_cls_token_without_pooler(dino_dir: Path) -> None:
    embedder = load_dino(str(dino_dir))
    assert isinstance(embedder, DinoEmbedder) and embedder.model.pooler is None
    images = [_image(300, 200, seed) for seed in range(3)]
    embeddings = embedder.embed_images(images)
    with torch.no_grad():
        expected = embedder.model(pixel_values=to_pixel_values(images, dino_preprocess())).last_hidden_state[
            :, 0
        ]
    assert embeddings.shape == (3, 32) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected)


def test_clip_embeddings_are_projected_and_unit_norm(clip_dir: Path) -> None:
    embedder = load_clip(str(clip_dir))
    assert isinstance(embedder, ClipEmbedder)
    images = [_image(200, 260, seed) for seed in range(2)]
    image_emb = embedder.embed_images(images)
    with torch.no_grad():
        projected = embedder.model.get_image_features(pixel_values=to_pixel_values(images, clip_preprocess()))
    torch.testing.assert_close(image_emb, torch.nn.functional.normalize(projected.pooler_output, dim=-1))
    text_emb = embedder.embed_texts(["a backpack in the snow", "a dog"])
    assert image_emb.shape == text_emb.shape == (2, 16)
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("loader", [load_dino, load_clip])
def test_missing_model_says_to_pass_a_local_path(loader, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pass a local folder"):
        loader(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="--my.flag /path/to/folder"):
        loader(str(tmp_path), flag="--my.flag")  # a folder without a model


class _Counting:
    def __init__(self, inner: DinoEmbedder) -> None:
        self.inner, self.name, self.seen = inner, inner.name, 0

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        self.seen += len(images)
        return self.inner.embed_images(images)


def test_cache_embeds_each_image_content_once(dino_dir: Path) -> None:
    embedder = _Counting(load_dino(str(dino_dir)))
    cache = EmbeddingCache()
    photos = [_image(64, 64, seed) for seed in range(3)]
    first = cache.embed(embedder, photos)
    again = cache.embed(embedder, [photo.copy() for photo in reversed(photos)])  # same pixels, new objects
    assert embedder.seen == 3
    torch.testing.assert_close(again, first.flip(0))
    cache.embed(embedder, [_image(64, 64, seed=9)])
    assert embedder.seen == 4


def test_identical_images_score_one_end_to_end(dino_dir: Path, clip_dir: Path) -> None:
    embedders = load_paper_embedders("cpu", dino=str(dino_dir), clip=str(clip_dir))
    photo = _image(96, 80)
    subject = SubjectPhotos("toy", "toy", [photo, photo.copy()])
    model = Samples(
        "DreamBooth", {"a qwv toy": [photo.copy()] * 2}, identifier="qwv", class_samples=[photo] * 2
    )
    result = score_subject(subject, [model], embedders)
    real, row = result.rows
    assert real.dino == pytest.approx(1.0) and real.clip_i == pytest.approx(1.0)
    assert (
        row.dino == pytest.approx(1.0) and row.clip_i == pytest.approx(1.0) and row.pres == pytest.approx(1.0)
    )
    assert row.div == pytest.approx(0.0, abs=1e-6) and row.class_div == pytest.approx(0.0, abs=1e-6)
    assert -1 <= row.clip_t <= 1
    assert [f.kind for f in result.prompts[0].flags] == ["overfitting"]
