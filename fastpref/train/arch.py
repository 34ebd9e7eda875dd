"""Which Stable Diffusion architecture a diffusers pipeline holds, read from its UNet's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# UNet2DConditionModel's addition_embed_type -> architecture: SDXL's UNet adds the pooled text
# embedding and the time ids ("text_time"); SD 1.5's adds nothing.
ADDITION_EMBED_ARCH = {None: "sd15", "text_time": "sdxl"}


def unet_config(path, revision: Optional[str] = None) -> dict:
    """The ``unet/config.json`` of a local pipeline folder, or of a Hub id (through the Hub's
    cache; ``revision`` picks the branch, tag or commit)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        file = folder / "unet" / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no unet/config.json)")
    else:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(str(path), "unet/config.json", revision=revision)
    return json.loads(Path(file).read_text())


def detect_arch(path, revision: Optional[str] = None) -> str:
    """``"sdxl"`` or ``"sd15"`` for a diffusers pipeline (folder or Hub id), from its UNet's
    ``addition_embed_type`` (not from its name); ``ValueError`` for any other UNet."""
    embed = unet_config(path, revision).get("addition_embed_type")
    if embed not in ADDITION_EMBED_ARCH:
        raise ValueError(
            f"{path}: a UNet with addition_embed_type {embed!r} is neither SD 1.5 (none) nor SDXL (text_time)"
        )
    return ADDITION_EMBED_ARCH[embed]
