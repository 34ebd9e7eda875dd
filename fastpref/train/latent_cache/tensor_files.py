"""The cache's files: safetensors written atomically, read memory-mapped and checked against
their header and the rows they must hold."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from ...files import write_atomic

logger = logging.getLogger(__name__)

_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_LATENT_TENSORS = ("rows", "latents", "original_sizes", "crop_top_lefts", "undecodable_rows")


class CacheFileError(ValueError):
    """A cache file that is truncated, unreadable or does not hold what the cache expects."""


def read_tensors(file) -> Dict[str, np.ndarray]:
    """The tensors of a safetensors ``file`` as read-only NumPy views of a memory map (nothing is
    read until used). Checked against the header first: :class:`CacheFileError` for a truncated
    or unreadable file. Hand-written because ``safetensors.torch.load_file`` reads the whole file."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise CacheFileError(f"{file}: truncated ({size} bytes, its header alone needs {length + 8})")
            header = json.loads(handle.read(length))
    except CacheFileError:
        raise
    except (OSError, ValueError, struct.error) as error:
        raise CacheFileError(f"{file}: unreadable ({error})") from None
    header.pop("__metadata__", None)
    start = 8 + length
    end = max([info["data_offsets"][1] for info in header.values()], default=0)
    if size != start + end:
        raise CacheFileError(f"{file}: {size} bytes, its header says {start + end} (truncated or torn)")
    data = np.memmap(file, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        out[name] = data[start + begin : start + stop].view(_NUMPY[info["dtype"]]).reshape(info["shape"])
    return out


def save_tensors(tensors: Dict[str, torch.Tensor], file: Path) -> None:
    """``tensors`` as the safetensors ``file``, written atomically (whole or not there)."""
    from safetensors.torch import save_file

    write_atomic(file, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def copy_tensor(array: np.ndarray) -> torch.Tensor:
    """A writable torch copy of a (memory-mapped) array."""
    return torch.from_numpy(np.array(array))


def check_latent_shard(file: Path, expected: np.ndarray) -> None:
    """:class:`CacheFileError` unless ``file`` is whole and covers exactly the rows ``expected``
    (``int64 [n]``: those it holds plus those it lists as undecodable)."""
    tensors = read_tensors(file)
    missing = set(_LATENT_TENSORS) - set(tensors)
    if missing:
        raise CacheFileError(f"{file}: no tensor(s) {sorted(missing)}")
    covered = np.union1d(np.asarray(tensors["rows"]), np.asarray(tensors["undecodable_rows"]))
    if not np.array_equal(covered, expected) or len(tensors["latents"]) != len(tensors["rows"]):
        raise CacheFileError(f"{file}: holds other rows than this shard's (a mismatched cache file)")


def check_text_shard(file: Path, count: int) -> None:
    """:class:`CacheFileError` unless ``file`` is whole and holds ``count`` caption embeddings."""
    tensors = read_tensors(file)
    if "prompt_embeds" not in tensors or len(tensors["prompt_embeds"]) != count:
        raise CacheFileError(f"{file}: does not hold the {count} caption embeddings of this shard")


def keep_shard(check, file: Path, *args) -> bool:
    """Whether a shard written before passes ``check(file, *args)`` and can be kept; a bad one
    is logged and removed, to be encoded again."""
    if not file.exists():
        return False
    try:
        check(file, *args)
        return True
    except CacheFileError as error:
        logger.warning("latent cache: %s; encoding it again", error)
        file.unlink(missing_ok=True)
        return False
