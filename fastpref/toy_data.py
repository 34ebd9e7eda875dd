"""Generated preference pairs in the Pick-a-Pic v2 schema, for tests and offline use.

``make_toy_data(path, pairs, resolution=32, seed=0, ties=0, corrupt=0)`` writes
``path/train.parquet`` with ``pairs`` rows and the Pick-a-Pic v2 columns the trainer reads:

===========  ========  =================================================================
column       type      value
===========  ========  =================================================================
caption      string    "a red circle on a blue background"
jpg_0        binary    JPEG bytes of the first image
jpg_1        binary    JPEG bytes of the second image
label_0      float64   1.0 (jpg_0 preferred), 0.0 (jpg_1 preferred) or 0.5 (tie)
label_1      float64   1 - label_0
===========  ========  =================================================================

Each caption names a shape, its colour and the background colour. The preferred image draws
exactly that; the rejected one gets one attribute wrong (the shape, its colour, or the
background), so the preference is learnable and checkable. Which side the preferred image is on
is random (both ``label_0`` values occur). ``ties`` rows (label 0.5) show two faithful drawings;
``corrupt`` rows carry bytes that start like a JPEG and do not decode, in ``jpg_0`` or ``jpg_1``.
Ties and corrupt rows sit at seeded random positions among the ``pairs`` rows.

Everything derives from ``seed`` (NumPy ``default_rng``): the same call writes the same rows.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond")
FILE_NAME = "train.parquet"


def caption_for(shape: str, color: str, background: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {background} background"


def draw(shape: str, color: str, background: str, resolution: int, rng: np.random.Generator):
    """A ``resolution`` x ``resolution`` RGB PIL image of ``shape`` in ``color`` on ``background``.

    Size and position are jittered with ``rng`` (the shape stays inside the canvas).
    """
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (resolution, resolution), COLORS[background])
    pen = ImageDraw.Draw(image)
    half = resolution * rng.uniform(0.22, 0.36)
    cx = rng.uniform(half, resolution - half)
    cy = rng.uniform(half, resolution - half)
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        pen.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    elif shape == "diamond":
        pen.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def encode_jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def corrupt_bytes(rng: np.random.Generator) -> bytes:
    """Bytes with a JPEG start-of-image marker and then noise: identified as JPEG, never decoded."""
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size=64, dtype=np.uint8).tobytes()


def _other(choices, current, rng):
    options = [c for c in choices if c != current]
    return options[int(rng.integers(len(options)))]


def make_rows(pairs: int, resolution: int = 32, seed: int = 0, ties: int = 0, corrupt: int = 0) -> Dict[str, list]:
    """The columns of :func:`make_toy_data` as Python lists (nothing written)."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if ties < 0 or corrupt < 0 or ties + corrupt > pairs:
        raise ValueError(f"need 0 <= ties + corrupt <= pairs, got ties={ties}, corrupt={corrupt}, pairs={pairs}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    rng = np.random.default_rng(seed)
    special = rng.permutation(pairs)
    tie_rows = set(special[:ties].tolist())
    corrupt_rows = set(special[ties : ties + corrupt].tolist())
    names = list(COLORS)
    columns: Dict[str, List] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for row in range(pairs):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = names[int(rng.integers(len(names)))]
        background = _other(names, color, rng)
        good = draw(shape, color, background, resolution, rng)
        if row in tie_rows:
            other = draw(shape, color, background, resolution, rng)  # two faithful drawings
            first, second, label = good, other, 0.5
        else:
            wrong = int(rng.integers(3))
            if wrong == 0:
                bad = draw(_other(SHAPES, shape, rng), color, background, resolution, rng)
            elif wrong == 1:
                bad = draw(shape, _other([n for n in names if n != background], color, rng), background, resolution, rng)
            else:
                bad = draw(shape, color, _other([n for n in names if n != color], background, rng), resolution, rng)
            if rng.random() < 0.5:
                first, second, label = good, bad, 1.0
            else:
                first, second, label = bad, good, 0.0
        jpg_0, jpg_1 = encode_jpeg(first), encode_jpeg(second)
        if row in corrupt_rows:
            if rng.random() < 0.5:
                jpg_0 = corrupt_bytes(rng)
            else:
                jpg_1 = corrupt_bytes(rng)
        columns["caption"].append(caption_for(shape, color, background))
        columns["jpg_0"].append(jpg_0)
        columns["jpg_1"].append(jpg_1)
        columns["label_0"].append(label)
        columns["label_1"].append(1.0 - label)
    return columns


def write_parquet(columns: Dict[str, list], file) -> Path:
    """Write Pick-a-Pic-style ``columns`` (caption, jpg_0, jpg_1, label_0[, label_1]) to ``file``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64()}
    table = pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, file)
    return file


def make_toy_data(path, pairs: int, resolution: int = 32, seed: int = 0, ties: int = 0, corrupt: int = 0) -> Path:
    """Write ``pairs`` generated rows (``ties`` of them ties, ``corrupt`` undecodable) to
    ``path/train.parquet``; returns the file's path."""
    columns = make_rows(pairs, resolution=resolution, seed=seed, ties=ties, corrupt=corrupt)
    return write_parquet(columns, Path(path) / FILE_NAME)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastpref make-toy-data",
        description="Write generated preference pairs (Pick-a-Pic v2 schema) to DIR/train.parquet.",
    )
    parser.add_argument("dir", help="output folder")
    parser.add_argument("--pairs", type=int, required=True, help="number of rows, ties and corrupt rows included")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ties", type=int, default=0, help="rows with label_0 = 0.5")
    parser.add_argument("--corrupt", type=int, default=0, help="rows with an undecodable image")
    args = parser.parse_args(argv)
    try:
        out = make_toy_data(args.dir, args.pairs, resolution=args.resolution, seed=args.seed, ties=args.ties, corrupt=args.corrupt)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.pairs} pairs ({args.ties} ties, {args.corrupt} corrupt) at {args.resolution}px to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
