"""Contact sheets: images in a grid, optionally with a text label above each row."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_grid(
    rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None, *, pad: int = 2,
    label_height: int = 14,
) -> Image.Image:
    """Lay out `rows` of images (each row left to right); `labels` caption the rows."""
    width = max(sum(im.width + pad for im in row) for row in rows) + pad
    heights = [max(im.height for im in row) + pad + (label_height if labels else 0) for row in rows]
    sheet = Image.new("RGB", (width, sum(heights) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for r, row in enumerate(rows):
        if labels:
            draw.text((pad, y), labels[r], fill="black")
            y += label_height
        x = pad
        for im in row:
            sheet.paste(im.convert("RGB"), (x, y))
            x += im.width + pad
        y += max(im.height for im in row) + pad
    return sheet


def upscale_for_viewing(image: Image.Image, min_size: int = 128) -> Image.Image:
    """Nearest-neighbour enlargement of tiny images so a grid of them is readable."""
    factor = max(1, -(-min_size // image.width))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image
