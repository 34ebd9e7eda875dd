"""Image grids: base (left) and a tuned model (right) side by side, one prompt a row, the first seed."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from fastpref.files import write_atomic

from .store import image_file

LABEL_HEIGHT = 14


def grid(output_dir, base: str, model: str, items: Sequence) -> "object":
    """A PIL image: a label row (``base``, ``model``), then per item the two images side by side."""
    from PIL import Image, ImageDraw

    pairs = []
    for item in items:
        pair = []
        for name in (base, model):
            with Image.open(image_file(output_dir, name, item)) as image:
                pair.append(image.convert("RGB"))
        pairs.append(pair)
    width, height = pairs[0][0].size
    canvas = Image.new("RGB", (2 * width, LABEL_HEIGHT + height * len(pairs)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, name in enumerate((base, model)):
        draw.text((column * width + 2, 1), name, fill="black")
    for row, pair in enumerate(pairs):
        for column, image in enumerate(pair):
            canvas.paste(image, (column * width, LABEL_HEIGHT + row * height))
    return canvas


def write_grids(output_dir, base: str, models: Sequence[str], items: Sequence) -> List[str]:
    """``grids/<base>-vs-<model>.png`` for every model; returns the paths relative to ``output_dir``."""
    files = []
    for model in models:
        relative = Path("grids") / f"{base}-vs-{model}.png"
        file = Path(output_dir) / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        image = grid(output_dir, base, model, items)
        write_atomic(file, lambda tmp: image.save(tmp, format="PNG"))
        files.append(str(relative))
    return files
