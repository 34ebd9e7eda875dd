"""Generated preference pairs in the Pick-a-Pic v2 parquet schema, for tests and offline use
(:func:`make_toy_data`, ``fastpref make-toy-data``): captioned shapes whose preferred image
draws the caption, seeded, with optional ties, corrupt rows and a biased AI judge's column.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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
JUDGE_COLUMN = "synthetic_label_0"
# Mixed into the judge's seed so that its noise is a stream of its own: the rows do not change
# when the judge is switched on.
_JUDGE_STREAM = 0x7D6E


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


def judge_probabilities(
    good_first: Sequence[Optional[bool]],
    colors: Sequence[str],
    seed: int = 0,
    *,
    bias_color: Optional[str] = "red",
    strength: float = 1.0,
    noise: float = 1.0,
) -> List[float]:
    """A biased, noisy, seeded judge: its probability that ``jpg_0`` is preferred, per row.

    Args:
        good_first: per row, True when ``jpg_0`` is the faithful image, False when ``jpg_1`` is,
            None for a tie.
        colors: per row, the shape color the caption names.
        seed: the judge's noise is ``default_rng([seed, 0x7D6E]).standard_normal(len(rows))``,
            one draw per row whatever the row is.
        bias_color: the color on which the judge is systematically wrong (its signal is
            negated); None for no systematic bias.
        strength: the size of the judge's signal on the logit scale (>= 0).
        noise: the standard deviation of its logit noise (>= 0).

    Returns the list of ``sigmoid(s * strength + noise * z)`` (floats in [0, 1]): ``s = +1`` when
    ``jpg_0`` is the faithful image, ``-1`` when ``jpg_1`` is, ``0`` for a tie, negated on every
    row whose shape color is ``bias_color`` (the judge is *systematically wrong* there). The
    judge prefers the faithful image with probability ``Phi(strength / noise)`` off the bias
    color and ``1 - Phi(strength / noise)`` on it.
    """
    if len(good_first) != len(colors):
        raise ValueError(f"colors must have one entry per row ({len(good_first)}), got {len(colors)}")
    if bias_color is not None and bias_color not in COLORS:
        raise ValueError(f"judge_bias_color must be one of {sorted(COLORS)} or None, got {bias_color!r}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"judge_strength must be a finite number >= 0, got {strength!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"judge_noise must be a finite number >= 0, got {noise!r}")
    z = np.random.default_rng([int(seed), _JUDGE_STREAM]).standard_normal(len(good_first))
    out = []
    for good, color, draw_z in zip(good_first, colors, z.tolist()):
        sign = 0.0 if good is None else (1.0 if good else -1.0)
        if color == bias_color:
            sign = -sign
        logit = sign * strength + noise * draw_z
        out.append(
            float(1.0 / (1.0 + math.exp(-logit))) if logit >= 0 else float(math.exp(logit) / (1.0 + math.exp(logit)))
        )
    return out


def make_rows(
    pairs: int,
    resolution: int = 32,
    seed: int = 0,
    ties: int = 0,
    corrupt: int = 0,
    *,
    judge: bool = False,
    judge_bias_color: Optional[str] = "red",
    judge_strength: float = 1.0,
    judge_noise: float = 1.0,
) -> Dict[str, list]:
    """The columns of :func:`make_toy_data` as Python lists (nothing written); with ``judge``
    also ``synthetic_label_0`` (:func:`judge_probabilities` with the ``judge_*`` arguments)."""
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
    shape_colors: List[str] = []
    if judge:  # check the judge's arguments before the (slow) drawing
        judge_probabilities([], [], seed, bias_color=judge_bias_color, strength=judge_strength, noise=judge_noise)
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
                bad = draw(
                    shape, _other([n for n in names if n != background], color, rng), background, resolution, rng
                )
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
        shape_colors.append(color)
    if judge:
        good_first = [None if label == 0.5 else label == 1.0 for label in columns["label_0"]]
        columns[JUDGE_COLUMN] = judge_probabilities(
            good_first, shape_colors, seed, bias_color=judge_bias_color, strength=judge_strength, noise=judge_noise
        )
    return columns


def write_parquet(columns: Dict[str, list], file) -> Path:
    """Write Pick-a-Pic-style ``columns`` (caption, jpg_0, jpg_1, label_0[, label_1,
    synthetic_label_0]) to ``file``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {
        "caption": pa.string(),
        "jpg_0": pa.binary(),
        "jpg_1": pa.binary(),
        "label_0": pa.float64(),
        "label_1": pa.float64(),
        JUDGE_COLUMN: pa.float64(),
    }
    table = pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, file)
    return file


def write_hub_layout(splits: Dict[str, Dict[str, list]], folder, files_per_split: int = 1) -> Path:
    """Write ``{split: columns}`` in the Hugging Face Hub's layout:
    ``folder/data/<split>-0000k-of-0000n.parquet`` (``files_per_split`` files each, the rows cut
    in order), as ``huggingface_hub`` snapshots of parquet datasets look. Returns ``folder``."""
    folder = Path(folder)
    for split, columns in splits.items():
        n = len(next(iter(columns.values())))
        bounds = np.linspace(0, n, files_per_split + 1).round().astype(int)
        for k in range(files_per_split):
            part = {name: values[bounds[k] : bounds[k + 1]] for name, values in columns.items()}
            write_parquet(part, folder / "data" / f"{split}-{k:05d}-of-{files_per_split:05d}.parquet")
    return folder


def write_webdataset(columns: Dict[str, list], folder, shards: int = 1, caption_key: str = "caption") -> Path:
    """Write Pick-a-Pic-style ``columns`` as webdataset tar shards ``folder/0000k.tar`` (the rows
    cut in order): per row ``<key>.jpg_0.jpg``, ``<key>.jpg_1.jpg``, ``<key>.<caption_key>.txt``
    and ``<key>.label_0.txt`` (the label as text, ``1.0``), keys ``000000``, ``000001``, ...;
    diffusers' Pick-a-Pic shards name the caption ``original_prompt``. Returns ``folder``."""
    import tarfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(columns["caption"])
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    for k in range(shards):
        with tarfile.open(folder / f"{k:05d}.tar", "w") as tar:
            for row in range(bounds[k], bounds[k + 1]):
                files = {
                    "jpg_0.jpg": columns["jpg_0"][row],
                    "jpg_1.jpg": columns["jpg_1"][row],
                    f"{caption_key}.txt": columns["caption"][row].encode(),
                    "label_0.txt": str(columns["label_0"][row]).encode(),
                }
                for suffix, data in files.items():
                    info = tarfile.TarInfo(f"{row:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def write_saved_dataset(columns: Dict[str, list], folder, split: Optional[str] = None) -> Path:
    """Write ``columns`` with ``datasets``' ``save_to_disk`` to ``folder``: a ``Dataset``, or with
    ``split`` a ``DatasetDict`` holding that one split. Returns ``folder``."""
    import datasets

    dataset = datasets.Dataset.from_dict(columns)
    (datasets.DatasetDict({split: dataset}) if split else dataset).save_to_disk(str(folder))
    return Path(folder)


def corrupt_rows(columns: Dict[str, list], rows: Sequence[int], seed: int = 0) -> Dict[str, list]:
    """A copy of ``columns`` whose ``jpg_0`` at each of ``rows`` holds :func:`corrupt_bytes` (a
    row that passes every cheap check and fails to decode)."""
    rng = np.random.default_rng(seed)
    out = {name: list(values) for name, values in columns.items()}
    for row in rows:
        out["jpg_0"][int(row)] = corrupt_bytes(rng)
    return out


def make_toy_data(
    path,
    pairs: int,
    resolution: int = 32,
    seed: int = 0,
    ties: int = 0,
    corrupt: int = 0,
    *,
    judge: bool = False,
    judge_bias_color: Optional[str] = "red",
    judge_strength: float = 1.0,
    judge_noise: float = 1.0,
) -> Path:
    """Write ``pairs`` generated rows (``ties`` of them ties, ``corrupt`` undecodable; with
    ``judge`` the ``synthetic_label_0`` column too) to ``path/train.parquet``; returns the file's
    path. The columns the trainer reads:

    ===========  ========  =================================================================
    column       type      value
    ===========  ========  =================================================================
    caption      string    "a red circle on a blue background"
    jpg_0        binary    JPEG bytes of the first image
    jpg_1        binary    JPEG bytes of the second image
    label_0      float64   1.0 (jpg_0 preferred), 0.0 (jpg_1 preferred) or 0.5 (tie)
    label_1      float64   1 - label_0
    ===========  ========  =================================================================

    Each caption names a shape, its color and the background color. The preferred image draws
    exactly that; the rejected one gets one attribute wrong (the shape, its color, or the
    background), so the preference is learnable and checkable. Which side the preferred image is
    on is random (both ``label_0`` values occur). ``ties`` rows (label 0.5) show two faithful
    drawings; ``corrupt`` rows carry bytes that start like a JPEG and do not decode, in ``jpg_0``
    or ``jpg_1``. Ties and corrupt rows sit at seeded random positions.

    With ``judge=True``, ``synthetic_label_0`` (float64 in [0, 1]) holds a simulated AI judge's
    probability that ``jpg_0`` is preferred (the input of DeDPO mode,
    ``PreferenceDataset(..., synthetic_labels=True)``): biased, noisy and seeded
    (:func:`judge_probabilities`). With the defaults the judge prefers the faithful image with
    probability Phi(1) ~ 0.84 on the other colors and ~ 0.16 on red ones, ~ 0.76 overall. The
    other columns are the same with or without the judge.

    Everything derives from ``seed`` (NumPy ``default_rng``): the same call writes the same rows.
    """
    columns = make_rows(
        pairs,
        resolution=resolution,
        seed=seed,
        ties=ties,
        corrupt=corrupt,
        judge=judge,
        judge_bias_color=judge_bias_color,
        judge_strength=judge_strength,
        judge_noise=judge_noise,
    )
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
    parser.add_argument(
        "--judge",
        action="store_true",
        help="also write synthetic_label_0: a seeded, biased, noisy AI judge's probability that jpg_0 is "
        "preferred (for DeDPO)",
    )
    parser.add_argument(
        "--judge_bias_color",
        default="red",
        help=f"--judge: the shape color on which the judge is systematically wrong ({', '.join(COLORS)}, or 'none')",
    )
    parser.add_argument(
        "--judge_strength", type=float, default=1.0, help="--judge: the judge's signal on the logit scale"
    )
    parser.add_argument(
        "--judge_noise", type=float, default=1.0, help="--judge: the standard deviation of its logit noise"
    )
    args = parser.parse_args(argv)
    bias = None if args.judge_bias_color.lower() == "none" else args.judge_bias_color
    try:
        out = make_toy_data(
            args.dir,
            args.pairs,
            resolution=args.resolution,
            seed=args.seed,
            ties=args.ties,
            corrupt=args.corrupt,
            judge=args.judge,
            judge_bias_color=bias,
            judge_strength=args.judge_strength,
            judge_noise=args.judge_noise,
        )
    except ValueError as error:
        parser.error(str(error))
    judged = f", judge biased on {bias or 'nothing'}" if args.judge else ""
    print(
        f"wrote {args.pairs} pairs ({args.ties} ties, {args.corrupt} corrupt{judged}) at {args.resolution}px to {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
