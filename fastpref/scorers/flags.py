"""The scorer flags both commands take, written once: ``--scorer_weights NAME.ROLE=PATH``
(:data:`WEIGHTS_HELP`, :func:`parse_weights`) and the scorer names (:data:`CHOICES`)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from . import SCORERS

WEIGHTS_FLAG = "--scorer_weights"
#: the scorer names, as a flag's help lists them
CHOICES = ", ".join(SCORERS)
WEIGHTS_HELP = (
    "NAME.ROLE=PATH: a scorer's weights from a local folder (or another Hub id), e.g. "
    "pickscore.model=/models/PickScore_v1; roles: "
    + "; ".join(f"{name}: {', '.join(scorer.weights)}" for name, scorer in SCORERS.items())
)


def parse_weights(values: List[str]) -> Dict[str, Dict[str, str]]:
    """``--scorer_weights`` values as ``{scorer: {role: path}}``; ``ValueError`` (starting with
    the flag) for a malformed value, an unknown scorer or role, or a local path (``/``, ``.``,
    ``~``: not a Hub id) that does not exist."""
    out: Dict[str, Dict[str, str]] = {}
    for value in values:
        key, sep, path = value.partition("=")
        name, dot, role = key.partition(".")
        if not (sep and dot and name and role and path):
            raise ValueError(f"{WEIGHTS_FLAG}: expected NAME.ROLE=PATH, got {value!r}")
        if name not in SCORERS:
            raise ValueError(f"{WEIGHTS_FLAG}: unknown scorer {name!r}; choices: {CHOICES}")
        if role not in SCORERS[name].weights:
            roles = ", ".join(f"{name}.{known}" for known in SCORERS[name].weights)
            raise ValueError(f"{WEIGHTS_FLAG}: {name} has no weights {role}; its weights: {roles}")
        if path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
            raise ValueError(f"{WEIGHTS_FLAG}: {key}: no such file or folder {path}")
        out.setdefault(name, {})[role] = path
    return out
