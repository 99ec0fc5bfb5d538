"""A confusion matrix as a PNG, drawn with Pillow alone (serving has no matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.files import atomic_write


def draw_confusion(path: Path, matrix, class_names: list[str], title: str) -> None:
    """Rows: true class, columns: predicted; each cell shaded by its share of its row (darker is
    more) and labelled with its count. Written atomically."""
    matrix = np.asarray(matrix)
    font = ImageFont.load_default(size=14)
    cell = 56
    label_width = max(int(font.getlength(c)) for c in class_names) + 16
    left, top = label_width + 24, 64
    width = max(left + cell * len(class_names) + 16, int(font.getlength(title)) + 16)  # the title whole
    size = (width, top + cell * len(class_names) + label_width + 24)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((left, top - 22), "predicted ->", fill="black", font=font)
    row_totals = matrix.sum(1, keepdims=True).clip(min=1)
    for i, name in enumerate(class_names):
        draw.text((8, top + i * cell + cell // 2 - 8), name, fill="black", font=font)
        for j in range(len(class_names)):
            share = matrix[i, j] / row_totals[i, 0]
            shade = int(255 - 200 * share)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2)
            draw.rectangle(box, fill=(shade, shade, 255))
            text = str(matrix[i, j])
            draw.text((box[0] + (cell - font.getlength(text)) / 2, box[1] + cell / 2 - 9), text,
                      fill="white" if share > 0.6 else "black", font=font)
    columns = Image.new("RGB", (label_width, cell * len(class_names)), "white")
    column_draw = ImageDraw.Draw(columns)
    for j, name in enumerate(class_names):
        column_draw.text((4, j * cell + cell // 2 - 8), name, fill="black", font=font)
    image.paste(columns.rotate(90, expand=True), (left, top + cell * len(class_names) + 8))
    with atomic_write(path) as tmp:
        image.save(tmp, "PNG")
