"""The images of a pair: the encoded bytes of a cell, their decoding and the preprocessing into
the ``[3, R, R]`` pixels the VAE takes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch


def image_bytes(value) -> Optional[bytes]:
    """The encoded bytes in an image cell (raw bytes or the ``{"bytes": ..., "path": ...}``
    struct of a Hugging Face ``Image`` feature; a path without bytes is read from disk);
    ``None`` when the cell holds no image."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if not data and path and Path(path).is_file():
            return Path(path).read_bytes()
        value = data
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    return None


def decode_image(data: bytes):
    """A fully decoded RGB PIL image; raises whatever PIL raises on bad bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def preprocess(
    image, resolution: int, *, crop: Optional[Tuple[float, float]] = None, flip: bool = False
) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bilinear), crop to ``resolution`` square, scale
    to [-1, 1]; optionally flip left-right.

    ``crop=None`` is the centre crop; ``crop=(fy, fx)`` in [0, 1) places the crop at
    ``top = floor(fy * (h - R + 1))``, ``left = floor(fx * (w - R + 1))`` (a random crop when
    ``fy, fx`` are uniform draws). ``flip`` mirrors the crop left-right, after cropping, as
    diffusers' scripts do. Returns ``(pixels [3, R, R] float32, (orig_h, orig_w), (crop_top,
    crop_left))``.
    """
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if crop is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = int(crop[0] * (new_h - resolution + 1)), int(crop[1] * (new_w - resolution + 1))
    if (new_w, new_h) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    if flip:
        array = array[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return pixels, (height, width), (top, left)


def decodes(cells: Sequence[bytes]) -> bool:
    """Whether every encoded image in ``cells`` decodes."""
    try:
        for data in cells:
            decode_image(data)
    except Exception:  # noqa: BLE001 - any decoder failure means "skip this row"
        return False
    return True
