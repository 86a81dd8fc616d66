"""One image-grid function for every report: evaluation thumbnails, the toy world's tables, comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: A cell: (image or ``None``, caption or ``None``, frame: ``True`` red = shows the concept, ``False`` green, ``None``).
Cell = tuple[Any, str | None, bool | None]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def _as_image(image: Any, cell: int) -> Image.Image:
    if image is None:
        return Image.new("RGB", (cell, cell), (128, 128, 128))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    scale = cell / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # upscaling (the toy world's 32 px images) keeps sharp pixels; downscaling filters
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def image_grid(
    rows: Sequence[Sequence[Cell | Any]],
    cell: int = 96,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    column_groups: Sequence[str] | None = None,
    pad: int = 4,
) -> Image.Image:
    """A grid of images, ``rows[r][c]`` each a :data:`Cell` or a bare image.

    Optional labels: one per row on the left, one per column on top (wrapped over up to three
    lines), and a group name above each column (red for concept prompts, green for ``unrelated``).
    A cell's caption goes under it; its frame says whether it shows the concept.
    """
    font = _font(11)
    cells = [[c if isinstance(c, tuple) else (c, None, None) for c in row] for row in rows]
    n_columns = max((len(row) for row in cells), default=1)
    captioned = any(caption for row in cells for _, caption, _ in row)
    label_w = 8 + 7 * max((len(label) for label in row_labels), default=0) if row_labels else 0
    header_h = (16 if column_groups else 0) + (44 if column_labels else 0)
    cell_h = cell + (14 if captioned else 0)
    width = label_w + n_columns * (cell + pad)
    height = header_h + len(cells) * (cell_h + pad)
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(n_columns):
        x = label_w + c * (cell + pad)
        y = 2
        if column_groups:
            group = column_groups[c]
            draw.text((x, y), group, fill=(0, 110, 0) if group == "unrelated" else (160, 0, 0), font=font)
            y += 16
        if column_labels:
            for k, line in enumerate(_wrap(column_labels[c], max(8, cell // 6))[:3]):
                draw.text((x, y + 14 * k), line, fill="black", font=font)
    for r, row in enumerate(cells):
        y = header_h + r * (cell_h + pad)
        if row_labels:
            draw.text((4, y + cell // 2 - 6), row_labels[r], fill="black", font=font)
        for c, (image, caption, frame) in enumerate(row):
            x = label_w + c * (cell + pad)
            tile = _as_image(image, cell - (4 if frame is not None else 0))
            offset = 2 if frame is not None else 0
            canvas.paste(tile, (x + offset, y + offset))
            if frame is not None:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline="red" if frame else "green", width=2)
            if caption:
                draw.text((x + 2, y + cell), caption[:20], fill="black", font=font)
    return canvas
