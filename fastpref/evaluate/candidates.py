"""The models an evaluation compares: the base pipeline and trained outputs of ``fastpref train``
(:class:`Candidate`), and each one's text-to-image pipeline, built through its model family."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch

BASE = "base"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file, as fastpref train writes it
ACCELERATE_MODEL_FILE = "model.safetensors"  # accelerate's save_state: the first prepared model (the denoiser)
KINDS = {
    "base": "the base pipeline",
    "lora": f"a LoRA ({LORA_FILE}) loaded with pipe.load_lora_weights",
    "full": "a full fine-tune's denoiser folder (unet/)",
    "full-checkpoint": f"a full fine-tune's checkpoint-N ({ACCELERATE_MODEL_FILE}) loaded into the base denoiser",
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One compared model: its ``name`` (folders and tables), ``kind`` (a key of :data:`KINDS`)
    and ``path`` (the trained output; None for the base)."""

    name: str
    kind: str
    path: Optional[str] = None


def default_name(path: Path) -> str:
    """A trained output's name: its folder's, with the run's for a ``checkpoint-N`` folder."""
    path = path.resolve()
    if re.fullmatch(r"checkpoint-\d+", path.name):
        return f"{path.parent.name}-{path.name}"
    return path.name


def kind_of(path: Path, denoiser_folder: str) -> str:
    if (path / LORA_FILE).is_file():
        return "lora"
    if (path / denoiser_folder / "config.json").is_file():
        return "full"
    if (path / ACCELERATE_MODEL_FILE).is_file():
        return "full-checkpoint"
    raise ValueError(
        f"--models: {path} holds no trained weights fastpref eval reads ({LORA_FILE}, {denoiser_folder}/config.json "
        f"or {ACCELERATE_MODEL_FILE})"
    )


def candidates(specs: Sequence[str], denoiser_folder: str = "unet") -> List[Candidate]:
    """The base, then one :class:`Candidate` per ``--models`` entry (``PATH`` or ``NAME=PATH``);
    ``ValueError`` naming the flag for a missing folder, unknown content or a repeated name."""
    found = [Candidate(BASE, "base")]
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--models: {path} is not a folder")
        name = name or default_name(folder)
        if not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"--models: name {name!r} must be letters, digits, '_', '-', '.', '+'")
        if name in {c.name for c in found}:
            raise ValueError(f"--models: two models are called {name!r}; name them with NAME=PATH")
        found.append(Candidate(name, kind_of(folder, denoiser_folder), str(folder.resolve())))
    return found


def load_denoiser(candidate: Candidate, source, family, dtype: torch.dtype):
    """The candidate's denoiser in ``dtype``: the base's, a full fine-tune's, or the base's with a
    full fine-tune checkpoint's weights (a LoRA is loaded into the pipeline afterwards)."""
    from fastpref.train.models import ModelSource

    if candidate.kind == "full":
        return family.load_denoiser(ModelSource(candidate.path), dtype)
    denoiser = family.load_denoiser(source, dtype)
    if candidate.kind == "full-checkpoint":
        from safetensors.torch import load_file

        denoiser.load_state_dict(load_file(str(Path(candidate.path) / ACCELERATE_MODEL_FILE)))
    return denoiser


def build_pipeline(candidate: Candidate, source, family, dtype: torch.dtype, device):
    """The family's validation pipeline (as ``fastpref train --run_validation`` samples) around
    the candidate's denoiser, its LoRA loaded, on ``device``, without a progress bar."""
    from fastpref.train.validation import build_pipeline as family_pipeline

    pipeline = family_pipeline(source, family, load_denoiser(candidate, source, family, dtype), dtype, device)
    if candidate.kind == "lora":
        pipeline.load_lora_weights(candidate.path)
    return pipeline
