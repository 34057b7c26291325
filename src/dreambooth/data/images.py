"""Load a user's subject photos robustly, and turn images into tensors and back.

Photo folders come from phones and file managers: they hold sidecar files, macOS `._*`
companions, photos stored sideways with an EXIF orientation, transparent PNG cut-outs, CMYK
JPEGs from print workflows and 16-bit scans. Each is turned into an upright 8-bit RGB image or
named in a message that says what to do; nothing crashes the run halfway.

User-facing messages go through `logging` (logger `dreambooth.data.images`), so that Python's
warning filters, which show a message once per call site, never hide a bad file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

MIN_IMAGES = 3
"""Fewest photos the paper uses (3-5 per subject); fewer rarely pin down a subject."""
MAX_IMAGES = 20
"""Beyond this, a folder more likely mixes subjects than helps; DreamBench subjects have 4-6."""
CAPTION_SUFFIX = ".txt"
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
"""Files that operating systems leave in photo folders; hidden files (".*") are ignored too."""
HEIF_SUFFIXES = frozenset({".heic", ".heif"})

LARGE_PHOTO_PIXELS = 89_478_485
"""Photos above this (Pillow's decompression-bomb warning size: 108 and 200 MP phone photos) are decoded
reduced and kept at `PHOTO_SIDE` pixels on their shorter side, not at full size for the whole run."""
PHOTO_SIDE = 2048
"""Shorter side a large photo is kept at: above every training and scoring resolution."""
PHOTO_PIXEL_LIMIT = 1_000_000_000
"""Pillow's decompression-bomb limit while reading a photo (the user's own file; Pillow's default refuses
the 200 MP photos of phone cameras): twice this is refused, as a file no camera writes."""

# Pillow raises OSError (UnidentifiedImageError included) for unreadable and truncated files;
# some of its plugins still raise SyntaxError for malformed headers.
_DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class LoadedImage:
    """One subject photo.

    Attributes:
        path: The file it was read from.
        image: The photo, upright, in 8-bit RGB.
        caption: The text of the sibling `<stem>.txt`, stripped, or None if there is none.
    """

    path: Path
    image: Image.Image
    caption: str | None


def load_images(folder: Path, *, on_bad_file: Literal["skip", "error"] = "skip") -> list[LoadedImage]:
    """Load every image in `folder`, sorted by file name.

    Every file that is not hidden, not a caption (`.txt`) and not an operating-system leftover
    is tried as an image, whatever its extension: Pillow decides (JPEG, PNG, WebP, BMP, TIFF,
    GIF, ...). Multi-frame files give their first frame. See `to_rgb` for the colour handling.

    Args:
        folder: The folder of photos; subfolders are not searched.
        on_bad_file: What to do with a file that is not a readable image: "skip" logs a warning
            naming it, "error" raises.

    Returns:
        The images with their captions. A warning is logged when there are fewer than
        `MIN_IMAGES` or more than `MAX_IMAGES`.

    Raises:
        FileNotFoundError: If `folder` does not exist.
        NotADirectoryError: If `folder` is a file.
        ValueError: If a file is not a readable image and `on_bad_file` is "error", if a caption
            is not UTF-8 text, or if the folder holds no image at all.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(
            f"instance_dir '{folder}' does not exist; point it at a folder of 3-10 photos."
        )
    if not folder.is_dir():
        raise NotADirectoryError(f"instance_dir '{folder}' is a file; point it at the folder that holds it.")
    entries = sorted(folder.iterdir(), key=lambda path: path.name)
    candidates = [path for path in entries if path.is_file() and not _is_ignored(path)]
    images: list[LoadedImage] = []
    for path in candidates:
        try:
            image = open_image(path)
        except _DECODE_ERRORS as error:
            message = _bad_file_message(path, error)
            if on_bad_file == "error":
                raise ValueError(message) from error
            logger.warning("Skipping %s", message)
            continue
        images.append(LoadedImage(path=path, image=image, caption=_read_caption(path)))
    _check_count(folder, images, entries)
    return images


def open_image(path: Path) -> Image.Image:
    """Read one image file, upright and in 8-bit RGB.

    Args:
        path: The image file.

    Returns:
        The image with its EXIF orientation applied, converted by `to_rgb`; one of more than
        `LARGE_PHOTO_PIXELS` shrunk to `PHOTO_SIDE` pixels on its shorter side (a JPEG decoded at
        reduced scale).

    Raises:
        OSError: If Pillow cannot read the file or it is truncated.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = max(limit, PHOTO_PIXEL_LIMIT)
    try:
        with Image.open(path) as image:
            large = image.width * image.height > LARGE_PHOTO_PIXELS
            if large:
                image.draft(None, _shrunk_size(image.size))  # JPEG: decoded at 1/2 to 1/8 scale, no smaller
            image.load()  # decodes now, so that a truncated file fails here, inside the `with`
            image = to_rgb(ImageOps.exif_transpose(image))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if large and min(image.size) > PHOTO_SIDE:
        image = image.resize(_shrunk_size(image.size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def _shrunk_size(size: tuple[int, int]) -> tuple[int, int]:
    scale = PHOTO_SIDE / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image mode to 8-bit RGB without losing the picture.

    - Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited onto white.
      The colour under a transparent pixel is undefined, often black, and the model has no alpha
      channel: cut-outs are meant to be seen on a light page, and white avoids dark halos around
      the subject.
    - 16-bit greyscale (I;16 and kin, and I, which Pillow uses for 16-bit data) is scaled by
      255 / 65535. Pillow's own `convert("RGB")` clips it at 255 instead, turning most of the
      picture white.
    - 32-bit float greyscale (F: float TIFFs) is read as [0, 1] when every value lies there (Pillow
      would make it black), else as 0-255; what lies outside is clipped.
    - Everything else (CMYK, greyscale, YCbCr, ...) uses Pillow's conversion. ICC colour
      profiles are not applied.

    Args:
        image: An image in any mode.

    Returns:
        The image in mode "RGB".
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int32).clip(0, 65535)  # [h, w]
        grey = ((values + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535), exactly
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))  # [h, w]
        scale = 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.rint(values * scale).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then crop the centre `size` x `size` square.

    Both happen in one Lanczos resampling of the centred square (Pillow's `box`), so the crop
    costs no second interpolation. Pillow widens the filter support by the downscale factor,
    which antialiases: large photos shrink without aliasing, unlike plain bilinear sampling.

    Args:
        image: The image, any size.
        size: Side of the output square, in pixels.

    Returns:
        A `size` x `size` image.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def center_crop_framing(
    size_wh: tuple[int, int], size: int, *, flipped: bool = False
) -> tuple[int, int, int, int]:
    """Where `resize_center_crop` took its square, as SDXL's micro-conditioning describes a crop.

    Returns:
        (original height, original width, crop top, crop left): the crop's top-left corner in the
        image resized so that its shorter side is `size`, as SDXL's training scripts measure it;
        mirrored horizontally when the crop is flipped.
    """
    width, height = size_wh
    scale = size / min(width, height)
    resized_w, resized_h = round(width * scale), round(height * scale)
    top, left = round((resized_h - size) / 2), round((resized_w - size) / 2)
    if flipped:
        left = resized_w - size - left
    return height, width, top, left


def warn_small_images(images: Sequence[LoadedImage], size: int) -> None:
    """Log a warning naming the images whose shorter side is below the training resolution.

    Such images are upscaled to `size`, which blurs the fine detail the model should learn.

    Args:
        images: The loaded photos.
        size: The training resolution, in pixels.
    """
    small = [
        f"{item.path.name} ({item.image.width}x{item.image.height})"
        for item in images
        if min(item.image.size) < size
    ]
    if small:
        logger.warning(
            "%d of %d images are smaller than the training resolution %d and will be upscaled, "
            "blurring fine detail: %s. Use larger originals if you have them.",
            len(small),
            len(images),
            size,
            ", ".join(small),
        )


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack same-sized RGB images into a float tensor in [-1, 1].

    Args:
        images: RGB images, all of one size (see `resize_center_crop`).

    Returns:
        A float32 tensor of shape [b, 3, h, w].

    Raises:
        ValueError: If `images` is empty, or the images differ in mode "RGB" or in size.
    """
    if not images:
        raise ValueError("to_tensor needs at least one image")
    modes = {image.mode for image in images}
    sizes = {image.size for image in images}
    if modes != {"RGB"} or len(sizes) > 1:
        raise ValueError(
            f"to_tensor needs RGB images of one size, got modes {sorted(modes)} and sizes {sorted(sizes)}; "
            "load them with load_images and pass them through resize_center_crop first"
        )
    return pixels_to_tensor(np.stack([np.asarray(image) for image in images]))


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels [b, h, w, 3] -> float32 [b, 3, h, w] in [-1, 1], the range every denoiser sees."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Turn a tensor in [-1, 1] back into RGB images; the inverse of `to_tensor`.

    Args:
        images: A tensor of shape [b, 3, h, w], any dtype and device; values outside [-1, 1]
            are clipped.

    Returns:
        b RGB images.

    Raises:
        ValueError: If `images` is not of shape [b, 3, h, w].
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"to_pil needs a tensor of shape [b, 3, h, w], got {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).numpy()]


def _is_ignored(path: Path) -> bool:
    """Whether a file is never an image: hidden, a caption, or an operating-system leftover."""
    return path.name.startswith(".") or path.suffix.lower() == CAPTION_SUFFIX or path.name in IGNORED_NAMES


def _read_caption(image_path: Path) -> str | None:
    """The stripped text of the image's sibling caption file, or None if there is none."""
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return None
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip()  # -sig: Notepad's byte-order mark
    except UnicodeDecodeError as error:
        raise ValueError(
            f"Caption '{caption_path}' is not UTF-8 text ({error}); re-save it as UTF-8."
        ) from error


def _bad_file_message(path: Path, error: BaseException) -> str:
    """Name an unreadable file, say why and what to do."""
    advice = "remove it from the folder, or re-save it as JPEG or PNG"
    if path.suffix.lower() in HEIF_SUFFIXES:
        advice = "convert it to JPEG, or `pip install pillow-heif` and register its opener"
    elif isinstance(error, Image.DecompressionBombError):
        advice = "downscale it; training uses 512-1024 pixels a side"
    return f"'{path}': not a readable image ({error}); {advice}."


def _check_count(folder: Path, images: Sequence[LoadedImage], entries: Sequence[Path]) -> None:
    """Raise if `folder` gave no image; warn if it gave fewer or more than DreamBooth wants."""
    count = f"instance_dir '{folder}' has {len(images)} image{'' if len(images) == 1 else 's'}"
    need = f"DreamBooth works from {MIN_IMAGES}-10 photos of one subject"
    if not images:
        names = [
            entry.name + ("/" if entry.is_dir() else "")
            for entry in entries
            if not entry.name.startswith(".")
        ]
        found = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        subfolders = [entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
        hint = (
            f" Subfolders are not searched: pass the one that holds the photos, e.g. '{subfolders[0]}'."
            if subfolders else ""
        )
        raise ValueError(f"{count}; found: {found or 'nothing'}. {need}.{hint}")
    if len(images) < MIN_IMAGES:
        logger.warning("%s; %s: with fewer, the model overfits to these views.", count, need)
    elif len(images) > MAX_IMAGES:
        logger.warning("%s; %s. Check that they all show the same subject.", count, need)
