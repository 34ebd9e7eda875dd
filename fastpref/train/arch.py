"""Which Stable Diffusion architecture a diffusers pipeline folder holds."""

from __future__ import annotations

import json
from pathlib import Path


def detect_arch(path) -> str:
    """ "sdxl" or "sd15" for a diffusers pipeline folder, from its ``model_index.json``.

    SDXL is recognised by a ``text_encoder_2`` entry (or, without a model index, a
    ``text_encoder_2`` folder) or an ``...XL...`` pipeline class; anything else is "sd15".
    """
    path = Path(path)
    index_file = path / "model_index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        entry = index.get("text_encoder_2")
        if (isinstance(entry, list) and entry and entry[0] is not None) or "XL" in str(index.get("_class_name", "")):
            return "sdxl"
        return "sd15"
    if (path / "text_encoder_2").is_dir():
        return "sdxl"
    if (path / "unet").is_dir() or (path / "text_encoder").is_dir():
        return "sd15"
    raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json, unet/ or text_encoder/)")
