"""Tests for loading subject photos, with every awkward file made on the fly."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dreambooth.data.images as images_module
from dreambooth.data.images import (
    load_images,
    resize_center_crop,
    to_pil,
    to_rgb,
    to_tensor,
    warn_small_images,
)

LOGGER = "dreambooth.data.images"
RED, WHITE = (255, 0, 0), (255, 255, 255)


def save_photos(folder: Path, names: list[str], size: tuple[int, int] = (24, 16)) -> None:
    """Save one small solid-colour image per name; Pillow picks the format from the suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / name)


def jpeg_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "source.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def test_loads_every_format_sorted_by_name_with_captions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_photos(tmp_path, ["e.tif", "b.png", "a.jpg", "d.bmp", "c.webp"])
    (tmp_path / "a.txt").write_text("  a photo of a zyk dog\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_images(tmp_path)
    assert [item.path.name for item in images] == ["a.jpg", "b.png", "c.webp", "d.bmp", "e.tif"]
    assert all(item.image.mode == "RGB" and item.image.size == (24, 16) for item in images)
    assert [item.caption for item in images] == ["a photo of a zyk dog", None, None, None, None]
    assert caplog.text == ""


def test_bad_files_are_skipped_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_photos(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "notes.jpg").write_text("not a photo")
    (tmp_path / "truncated.jpg").write_bytes(jpeg_bytes(tmp_path)[:400])
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_images(tmp_path)
    assert [item.path.name for item in images] == ["a.png", "b.png", "c.png"]
    for name in ["notes.jpg", "truncated.jpg", "IMG_0001.HEIC"]:
        assert name in caplog.text
    assert "truncated" in caplog.text and "re-save it as JPEG or PNG" in caplog.text
    assert "pillow-heif" in caplog.text


def test_captions_with_a_byte_order_mark_or_another_encoding(tmp_path: Path) -> None:
    save_photos(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "a.txt").write_text("a zyk dog", encoding="utf-8-sig")
    assert load_images(tmp_path)[0].caption == "a zyk dog"
    (tmp_path / "b.txt").write_bytes("a caf\xe9 dog".encode("cp1252"))
    with pytest.raises(ValueError, match=r"b\.txt' is not UTF-8 text.*re-save it as UTF-8"):
        load_images(tmp_path)


def test_an_image_beyond_any_camera_is_named_with_advice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_photos(tmp_path, ["a.png", "b.png", "c.png"], size=(8, 8))
    save_photos(tmp_path / "x", ["huge.png"], size=(64, 64))
    (tmp_path / "x" / "huge.png").rename(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(images_module, "PHOTO_PIXEL_LIMIT", 1000)  # refused over twice this
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(load_images(tmp_path)) == 3
    assert "huge.png" in caplog.text and "downscale it" in caplog.text


def test_bad_file_raises_in_error_mode(tmp_path: Path) -> None:
    save_photos(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(ValueError, match=r"notes\.jpg.*not a readable image.*remove it"):
        load_images(tmp_path, on_bad_file="error")


def test_hidden_files_and_os_leftovers_are_ignored_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_photos(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_images(tmp_path, on_bad_file="error")
    assert len(images) == 3
    assert caplog.text == ""


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("name", "image", "expected"),
    [
        ("transparent.png", Image.new("RGBA", (4, 4), (0, 0, 0, 0)), WHITE),
        ("half_red.png", Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),
        ("grey_alpha.png", Image.new("LA", (4, 4), (0, 0)), WHITE),
        ("palette.png", palette_with_transparency(), WHITE),
        ("grey.png", Image.new("L", (4, 4), 100), (100, 100, 100)),
        ("print.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), RED),
    ],
)
def test_colour_modes_become_rgb(
    tmp_path: Path, name: str, image: Image.Image, expected: tuple[int, int, int]
) -> None:
    image.save(tmp_path / name)
    (loaded,) = load_images(tmp_path)
    assert loaded.image.mode == "RGB"
    assert np.abs(np.asarray(loaded.image)[1, 1].astype(int) - expected).max() <= 2


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 32767, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "scan.png")
    (loaded,) = load_images(tmp_path)
    assert np.asarray(loaded.image)[0, :, 0].tolist() == [0, 100, 127, 255]
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode "I", as older Pillow opened 16-bit PNGs
    assert np.asarray(to_rgb(as_int32))[0, :, 1].tolist() == [0, 100, 127, 255]


def test_float_greyscale_in_zero_one_is_scaled_not_blackened(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "linear.tif")
    (loaded,) = load_images(tmp_path)
    assert np.asarray(loaded.image)[0, :, 0].tolist() == [0, 128, 255]
    as_0_255 = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(as_0_255))[0, :, 2].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), RED)
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left edge goes on top
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    (loaded,) = load_images(tmp_path)
    assert loaded.image.size == (20, 40)
    top, bottom = np.asarray(loaded.image)[[5, 35], 10].astype(int)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_photos_above_pillows_size_limit_load_upright_and_are_kept_smaller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow refuses images above 2 x 89 MP as decompression bombs: a 200 MP phone photo was skipped. They
    load (a JPEG decoded at reduced scale), are kept at PHOTO_SIDE on their shorter side, and keep their EXIF
    orientation. Sizes scaled down here: Pillow's limit 5,000 px, photos of 320x160 = 51,200 px."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    monkeypatch.setattr(images_module, "LARGE_PHOTO_PIXELS", 5_000)
    monkeypatch.setattr(images_module, "PHOTO_SIDE", 40)
    monkeypatch.setattr(images_module, "PHOTO_PIXEL_LIMIT", 100_000)
    image = Image.new("RGB", (320, 160), RED)
    image.paste((0, 0, 255), (160, 0, 320, 160))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the left edge goes on top
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    image.save(tmp_path / "scan.png")

    jpeg, png = load_images(tmp_path)
    assert jpeg.image.size == (40, 80) and png.image.size == (80, 40)
    top, bottom = np.asarray(jpeg.image)[[10, 70], 20].astype(int)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50
    assert Image.MAX_IMAGE_PIXELS == 5_000  # Pillow's own limit is back for everything else


def test_missing_folder_and_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instance_dir '.*nowhere' does not exist"):
        load_images(tmp_path / "nowhere")
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_images(tmp_path / "a.jpg")


def test_folder_without_images_lists_what_it_found(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.txt").write_text("a caption without a photo")
    (tmp_path / "b.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(ValueError, match=r"has 0 images; found: a\.txt, b\.pdf\. DreamBooth works from 3-10"):
        load_images(tmp_path)
    assert "b.pdf" in caplog.text  # skipped with a warning before the error


def test_a_folder_of_subfolders_names_the_one_to_pass(tmp_path: Path) -> None:
    save_photos(tmp_path / "dog", ["a.png", "b.png", "c.png"])
    with pytest.raises(ValueError, match=r"found: dog/\..*Subfolders are not searched: pass .*'.*dog'"):
        load_images(tmp_path)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".DS_Store").write_bytes(b"")
    with pytest.raises(ValueError, match="has 0 images; found: nothing"):
        load_images(tmp_path)


@pytest.mark.parametrize(("count", "message"), [(2, "has 2 images"), (21, "has 21 images")])
def test_unusual_image_counts_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, count: int, message: str
) -> None:
    save_photos(tmp_path, [f"{i:02d}.png" for i in range(count)], size=(4, 4))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(load_images(tmp_path)) == count
    assert message in caplog.text


@pytest.mark.parametrize("size", [(90, 30), (30, 90)])
def test_resize_center_crop_keeps_the_centre(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, RED)
    width, height = size
    centre = (
        (width // 3, 0, 2 * width // 3, height)
        if width > height
        else (0, height // 3, width, 2 * height // 3)
    )
    image.paste((0, 255, 0), centre)
    cropped = resize_center_crop(image, 12)
    assert cropped.size == (12, 12)
    # Lanczos reads a few pixels past the crop, as resizing the whole image would: only the
    # outermost output pixels see the red sides.
    inner = np.asarray(cropped)[1:-1, 1:-1].astype(int)
    assert np.abs(inner - (0, 255, 0)).max() <= 3


def test_resize_center_crop_upscales_small_images() -> None:
    assert resize_center_crop(Image.new("RGB", (8, 6)), 32).size == (32, 32)


def test_small_images_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_photos(tmp_path, ["big.png"], size=(64, 48))
    save_photos(tmp_path / "x", ["tiny.png"], size=(16, 16))
    images = load_images(tmp_path) + load_images(tmp_path / "x")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        warn_small_images(images, 32)
    assert "tiny.png (16x16)" in caplog.text and "big.png" not in caplog.text


def test_tensor_round_trip_is_exact() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    images = [Image.fromarray(array) for array in pixels]
    tensor = to_tensor(images)
    assert tensor.shape == (2, 3, 5, 7) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[0, 0, 0, 0].item() == pytest.approx(pixels[0, 0, 0, 0] / 127.5 - 1)
    assert all(
        np.array_equal(np.asarray(back), array) for back, array in zip(to_pil(tensor), pixels, strict=True)
    )


def test_to_pil_clips_out_of_range_values() -> None:
    (image,) = to_pil(torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1))
    assert image.getpixel((0, 0)) == (0, 128, 255)


def test_tensor_conversions_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="one size"):
        to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))])
    with pytest.raises(ValueError, match="RGB"):
        to_tensor([Image.new("RGBA", (4, 4))])
    with pytest.raises(ValueError, match="at least one"):
        to_tensor([])
    with pytest.raises(ValueError, match=r"\[b, 3, h, w\]"):
        to_pil(torch.zeros(3, 4, 4))
