"""The reward models fastpref scores images with, one :class:`~.base.Scorer` subclass each:
:data:`SCORERS` by name, :func:`make_scorer`, and the flags that name them (:mod:`.flags`),
shared by ``fastpref eval`` (``--metrics``) and ``fastpref train`` (``--validation_scorer``).

A low room: it imports torch at import time and transformers / open_clip / ImageReward only when a
scorer loads; never the trainer, the evaluation or the demo, which both import it."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

import torch

from .aesthetic import Aesthetic
from .base import MissingExtraError, Scorer
from .clip_score import CLIPScore
from .hpsv2 import HPSv2
from .image_reward import ImageReward
from .pickscore import PickScore

#: every scorer, by its name (``--metrics``, ``--validation_scorer``)
SCORERS = MappingProxyType({scorer.name: scorer for scorer in (PickScore, HPSv2, ImageReward, Aesthetic, CLIPScore)})


def scorer_class(name: str, flag: str = "--metrics"):
    """The :class:`Scorer` subclass called ``name``; ``ValueError`` naming ``flag`` and the choices."""
    if name not in SCORERS:
        raise ValueError(f"{flag}: unknown metric {name!r}; choices: {', '.join(SCORERS)}")
    return SCORERS[name]


def make_scorer(name: str, weights: Optional[Mapping[str, str]] = None, device="cpu", dtype=torch.float32) -> Scorer:
    """The scorer ``name`` with its weights loaded (``weights``: role -> local folder or Hub id,
    replacing its defaults) on ``device`` in ``dtype``."""
    return scorer_class(name)(weights, device=device, dtype=dtype)


__all__ = ["SCORERS", "Scorer", "MissingExtraError", "scorer_class", "make_scorer"]
