"""The rules of ``--output_dir``: what a run leaves there (:data:`RUN_FILES`), when a new run may
start in it (:func:`check_output_dir`), and ``--overwrite_output_dir``'s move aside
(:func:`move_aside`)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import List, Optional

from ..files import replace_durably
from .arguments import ArgumentError, RunArguments
from .checkpoints import resolve_resume
from .families import FAMILIES

logger = logging.getLogger("fastpref.train")

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
# What a run leaves in its --output_dir (a full fine-tune: its family's denoiser folder): a fresh
# run stops rather than mix with them.
RUN_FILES = (
    "checkpoint-*",
    WEIGHTS_FILE,
    *sorted({f.denoiser_folder for f in FAMILIES.values()}),
    LOG_FILE,
    SUMMARY_FILE,
)


def check_output_dir(run: RunArguments) -> None:
    """``--output_dir`` is a folder this process can write in, or can be made in one (nothing is
    created here); a fresh run needs it unused (or ``--overwrite_output_dir``);
    ``--resume_from_checkpoint`` names a checkpoint."""
    output_dir = Path(run.output_dir)
    existing = next(p for p in (output_dir, *Path(os.path.abspath(output_dir)).parents) if p.exists())
    if not existing.is_dir():
        raise ArgumentError(f"--output_dir: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ArgumentError(f"--output_dir: cannot write in {existing} ({error.strerror or error})") from None
    if run.resume_from_checkpoint:
        if run.overwrite_output_dir and run.resume_from_checkpoint == "latest":
            raise ArgumentError("--overwrite_output_dir: cannot be combined with --resume_from_checkpoint latest")
        try:
            resolve_resume(run.resume_from_checkpoint, output_dir)
        except FileNotFoundError as error:
            raise ArgumentError(str(error)) from None
        return
    used = used_by_a_run(output_dir)
    if used and not run.overwrite_output_dir:
        raise ArgumentError(
            f"--output_dir: {output_dir} already holds a run ({', '.join(used)}); continue it with "
            "--resume_from_checkpoint latest, or start a new run there with --overwrite_output_dir "
            "(moves the old contents aside)"
        )


def used_by_a_run(output_dir: Path) -> List[str]:
    """The names in ``output_dir`` that a run wrote (:data:`RUN_FILES`), sorted."""
    return sorted({path.name for pattern in RUN_FILES for path in output_dir.glob(pattern)})


def move_aside(output_dir: Path) -> Optional[Path]:
    """``--overwrite_output_dir``: rename a used ``output_dir`` to ``<output_dir>.old-N`` (the
    first N free), so the two runs never mix. Returns the new name."""
    if not used_by_a_run(output_dir):
        return None
    output_dir = Path(os.path.abspath(output_dir))  # "." has no name to add a suffix to
    number = 1
    while output_dir.with_name(f"{output_dir.name}.old-{number}").exists():
        number += 1
    aside = output_dir.with_name(f"{output_dir.name}.old-{number}")
    replace_durably(output_dir, aside)
    logger.warning("--overwrite_output_dir: moved the previous contents of %s to %s", output_dir, aside)
    return aside
