"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one,
never a torn one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def write_atomic(file, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``file``, fsync it, then rename it over
    ``file`` with :func:`replace_durably`. The temporary file is removed if ``write`` raises."""
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        replace_durably(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file


def write_text_atomic(file, text: str) -> Path:
    """``text`` written with :func:`write_atomic`."""
    return write_atomic(file, lambda tmp: tmp.write_text(text))


def write_json_atomic(file, obj) -> Path:
    """``obj`` as indented, key-sorted JSON, written with :func:`write_atomic`."""
    return write_text_atomic(file, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def replace_durably(source, destination) -> None:
    """Rename ``source`` to ``destination`` (``os.replace``: atomic within one file system), then
    fsync the folder that holds it, so that the rename survives a power cut."""
    os.replace(source, destination)
    fsync_dir(Path(destination).parent)


def fsync_dir(folder) -> None:
    """fsync a folder, so that the renames and new entries in it survive a power cut (POSIX; a
    no-op where folders cannot be opened, as on Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
