"""The scorer interface: :class:`Scorer`, one reward model behind one call, with its model ids,
preprocessing and scale written once in its class; and :class:`MissingExtraError`."""

from __future__ import annotations

import abc
import importlib.util
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch


class MissingExtraError(ImportError):
    """A scorer's package is not installed; the message names the extra that installs it."""


class Scorer(abc.ABC):
    """A reward model that scores (image, prompt) pairs, higher is better.

    A subclass writes once: :attr:`name` (the ``--metrics`` name), :attr:`weights` (each role's
    default Hub id, e.g. ``{"model": ..., "processor": ...}``; ``--scorer_weights
    NAME.ROLE=PATH`` replaces one with a local folder or another id), :attr:`scale` and
    :attr:`reference` (what the number is, and the code it matches), :attr:`packages` and
    :attr:`extra` (the modules it imports and the pip extra that installs them).
    """

    name: str
    title: str
    weights: Mapping[str, str]
    scale: str
    reference: str
    packages: Tuple[str, ...] = ("transformers",)
    extra: str = "train"

    def __init__(self, weights: Optional[Mapping[str, str]] = None, device="cpu", dtype=torch.float32):
        self.check_installed()
        unknown = sorted(set(weights or {}) - set(self.weights))
        if unknown:
            raise ValueError(
                f"--scorer_weights: {self.name} has no weights {', '.join(unknown)}; its weights: "
                + ", ".join(f"{self.name}.{role}" for role in self.weights)
            )
        #: the weights this scorer loaded, role -> Hub id or local folder
        self.sources: Dict[str, str] = {**self.weights, **(weights or {})}
        self.device, self.dtype = torch.device(device), dtype
        self.load(self.sources)

    @classmethod
    def check_installed(cls) -> None:
        """``MissingExtraError`` naming the extra when a package of :attr:`packages` is missing."""
        missing = [package for package in cls.packages if importlib.util.find_spec(package) is None]
        if missing:
            raise MissingExtraError(
                f"the {cls.name} scorer needs {', '.join(missing)}: pip install 'fastpref[{cls.extra}]'"
            )

    @abc.abstractmethod
    def load(self, sources: Mapping[str, str]) -> None:
        """Load the weights of ``sources`` (role -> Hub id or local folder) on :attr:`device`."""

    @abc.abstractmethod
    def score(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        """The scores ``[N]`` (float32, CPU) of ``N`` PIL images, each with its prompt."""


def hub_file(source: str, filename: str) -> str:
    """``source/filename`` when ``source`` is a local folder, else that file of the Hub repository
    ``source`` (downloaded once into the Hugging Face cache)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        file = folder / filename
        if not file.is_file():
            raise FileNotFoundError(f"{folder} has no {filename}")
        return str(file)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source, filename)
