"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one,
never a torn one; and the checksum by which a reader proves a file whole."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable


def write_atomic(file, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``file``, fsync it, then rename it over
    ``file`` with :func:`replace_durably`. The temporary file is removed if ``write`` raises; a
    full disk raises ``OSError(ENOSPC)`` naming ``file`` (:func:`disk_full_named`)."""
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        with disk_full_named(file):
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


# How a full disk reaches Python from the writers the trainer uses, besides OSError(ENOSPC):
# safetensors' SafetensorError ("... (os error 28)"), torch.save's RuntimeError ("file write
# failed", or "unexpected pos ..." raised from "basic_ios::clear: iostream error").
_DISK_FULL_WORDS = ("no space left on device", "os error 28", "file write failed", "basic_ios::clear")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says the disk is full: errno ENOSPC
    (or EDQUOT, a full quota), or the words safetensors and torch wrap it in."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(error).lower() for words in _DISK_FULL_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_named(path, remove: bool = False):
    """Turn a full disk inside the block (:func:`is_disk_full`) into ``OSError(ENOSPC)`` whose
    message names ``path`` ("no space left on the device while writing PATH"); with ``remove``,
    what was written at ``path`` (a file or a folder, torn) is removed first. Other errors pass."""
    path = Path(path)
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        if remove:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}") from error


def sha256_of(file) -> str:
    """The sha256 of ``file``'s bytes, hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
