"""The evaluation's files in ``--output_dir``, one per (model, prompt, seed), so that an
interrupted run resumes where it stopped and a new model reuses the base's images::

    images/<model>/<key>.png                  written atomically; present = done
    images/<model>/settings.json              what made them (a rerun must match)
    scores/<metric>/<model>/<key>.json        {"score": float}, atomically
    scores/<metric>/settings.json             the scorer's weights

``<key>`` is ``<prompt index>-<hash of the prompt>-seed<seed>``: another prompt list never
reuses a file made for a different prompt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Tuple

from fastpref.files import write_json_atomic

SETTINGS = "settings.json"


def key(index: int, prompt: str, seed: int) -> str:
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    return f"{index:05d}-{digest}-seed{seed}"


def image_file(output_dir, model: str, item: Tuple[int, str, int]) -> Path:
    return Path(output_dir) / "images" / model / f"{key(*item)}.png"


def score_file(output_dir, metric: str, model: str, item: Tuple[int, str, int]) -> Path:
    return Path(output_dir) / "scores" / metric / model / f"{key(*item)}.json"


def check_settings(folder: Path, settings: dict, what: str) -> None:
    """``ValueError`` naming the differences if ``folder`` records settings other than
    ``settings`` (its files were made otherwise); read-only, so every process may call it."""
    file = Path(folder) / SETTINGS
    if not file.is_file():
        return
    old = json.loads(file.read_text())
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        raise ValueError(
            f"--output_dir: {folder} holds {what} made with other settings ("
            + "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            + "); use another --output_dir or remove that folder"
        )


def claim(folder: Path, settings: dict) -> None:
    """Make ``folder``, remove the temporary files a killed run left in it, and record
    ``settings`` unless it holds them (:func:`check_settings` first). One process only, while
    no other writes there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.rglob(".*.tmp*"):
        stale.unlink(missing_ok=True)
    if not (folder / SETTINGS).is_file():
        write_json_atomic(folder / SETTINGS, settings)


def read_score(file: Path) -> float:
    return float(json.loads(file.read_text())["score"])


def write_score(file: Path, value: float) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(file, {"score": float(value)})
