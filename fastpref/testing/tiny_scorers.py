"""Tiny random-weight reward models in the folder layouts and classes of the real ones, so that
the scorers (:mod:`fastpref.scorers`) load them with the code a user runs (nothing is downloaded):
:func:`make_tiny_scorers` writes them and returns the ``--scorer_weights`` that point at them.

- ``pickscore/model`` (``CLIPModel``, as ``yuvalkirstain/PickScore_v1``) and
  ``pickscore/processor`` (``CLIPProcessor``, as ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``);
- ``clip/`` (``CLIPModel`` + ``CLIPProcessor`` in one folder, as ``openai/clip-vit-large-patch14``);
- ``aesthetic/clip/`` (the same) and ``aesthetic/mlp/aesthetic-model.pth`` (the predictor's
  state dict, ``layers.N.*``, as ``trl-lib/ddpo-aesthetic-predictor``).

HPS v2.1 and ImageReward need open_clip / image-reward (see the README's Evaluation section).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

from .tiny_model import MAX_LENGTH, load_tokenizer, write_tokenizer

IMAGE_SIZE = 32
PROJECTION_DIM = 16


def clip_config(vocab_size: int):
    """A tiny ``CLIPConfig``: 16-wide, one layer per tower, 32 px images in 8 px patches."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=IMAGE_SIZE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)


def write_clip(model_folder: Path, processor_folder: Path, seed: int) -> None:
    """A tiny ``CLIPModel`` (weights from ``seed``) and its ``CLIPProcessor`` (the tiny CLIP BPE
    tokenizer, 32 px resize and centre crop, CLIP's mean/std)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    staging = processor_folder.parent / f".{processor_folder.name}.tokenizer"
    vocab, _ = write_tokenizer(staging)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE),
        tokenizer=load_tokenizer(staging),
    )
    processor.save_pretrained(str(processor_folder))
    shutil.rmtree(staging)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(clip_config(len(vocab)))
    model.save_pretrained(str(model_folder), safe_serialization=True)


def make_tiny_scorers(root, seed: int = 0) -> Dict[str, str]:
    """Write the tiny scorers under ``root``; returns ``{"pickscore.model": folder, ...}``, the
    ``--scorer_weights`` of ``fastpref eval`` (``NAME.ROLE=FOLDER``)."""
    import torch

    from fastpref.scorers.aesthetic import MLP_FILE, AestheticMLP

    root = Path(root)
    write_clip(root / "pickscore" / "model", root / "pickscore" / "processor", seed)
    write_clip(root / "clip", root / "clip", seed + 1)
    write_clip(root / "aesthetic" / "clip", root / "aesthetic" / "clip", seed + 2)
    (root / "aesthetic" / "mlp").mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        torch.save(AestheticMLP(PROJECTION_DIM).state_dict(), root / "aesthetic" / "mlp" / MLP_FILE)
    return {
        "pickscore.model": str(root / "pickscore" / "model"),
        "pickscore.processor": str(root / "pickscore" / "processor"),
        "clip.model": str(root / "clip"),
        "clip.processor": str(root / "clip"),
        "aesthetic.clip": str(root / "aesthetic" / "clip"),
        "aesthetic.processor": str(root / "aesthetic" / "clip"),
        "aesthetic.mlp": str(root / "aesthetic" / "mlp"),
    }


WEIGHTS_FILE = "weights.txt"


def main(argv=None) -> int:
    """``python -m fastpref.testing.tiny_scorers DIR``: write the tiny scorers into DIR, and their
    ``--scorer_weights`` (``NAME.ROLE=FOLDER ...``) into ``DIR/weights.txt`` and to stdout."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastpref.testing.tiny_scorers", description=main.__doc__)
    parser.add_argument("dir", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    weights = make_tiny_scorers(args.dir, args.seed)
    line = " ".join(f"{key}={value}" for key, value in weights.items())
    (Path(args.dir) / WEIGHTS_FILE).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
