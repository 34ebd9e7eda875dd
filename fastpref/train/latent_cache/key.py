"""The cache key: what the cached latents and embeddings depend on (the data set's rows, the
model, the resolution, the encoding), hashed into the name of the cache's folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ...files import sha256_of
from ..data import PreferenceDataset
from ..families import FAMILIES
from ..models import ModelSource

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2


def rows_to_encode(dataset: PreferenceDataset) -> np.ndarray:
    """Every row that passed the dataset's cheap checks, whether or not it decoded them up front
    (``check_images``), so that the cache's contents do not depend on that switch: the rows that
    do not decode are recorded as undecodable. Rows skipped only for a malformed judge value
    (DeDPO mode) are encoded too: the key does not depend on the mode, so a cache built in DeDPO
    mode must serve a plain dataset of the same files as well. ``int64 [N]``, ascending."""
    rows = np.union1d(dataset.valid_rows, np.asarray(dataset.skipped["undecodable"], dtype=np.int64))
    return np.union1d(rows, np.asarray(dataset.judge_malformed_rows, dtype=np.int64)).astype(np.int64)


def _arrow_files(dataset: PreferenceDataset) -> list:
    """``[path, size, mtime_ns]`` of each Arrow file behind a split the dataset opened itself
    from its ``source`` path (a whole split: nothing selects or reorders its rows); ``[]`` for a
    ``datasets.Dataset`` passed in (its row selection is not public) or one held in memory."""
    if not isinstance(dataset.source, str):
        return []
    files = []
    for entry in dataset.data.cache_files:
        stat = os.stat(entry["filename"])
        files.append([str(Path(entry["filename"]).resolve()), stat.st_size, stat.st_mtime_ns])
    return files


def _content_digest(dataset: PreferenceDataset) -> str:
    """SHA-256 of each encoded row's index, caption and both images' bytes, length-prefixed."""
    digest = hashlib.sha256()
    for row in rows_to_encode(dataset).tolist():
        cells = [str(row).encode(), str(dataset.caption(row)).encode()]
        cells += [dataset.image_data(row, which) or b"" for which in (0, 1)]
        for cell in cells:
            digest.update(len(cell).to_bytes(8, "little") + cell)
    return digest.hexdigest()


def dataset_fingerprint(dataset: PreferenceDataset) -> dict:
    """What the cached rows depend on, from public information only: the Arrow files of a split
    opened from a path (their paths, sizes and modification times: any rewrite changes them, and
    a stat costs nothing at 1M pairs), else a content digest of the rows the cache encodes
    (:func:`_content_digest`; reads every image once); with the split, row count and columns.
    Not ties, flips or the subset: those apply on top of the cache."""
    files = _arrow_files(dataset)
    if files:
        origin = {"arrow_files": files}
    else:
        logger.info("latent cache: keying the data set by the content of its rows (reads every image once)")
        origin = {"content_sha256": _content_digest(dataset)}
    return {**origin, "split": dataset.split, "num_rows": dataset.num_rows, "columns": dataset.columns}


# The pipeline folders the encodings may depend on: every family's (a family's own are a subset).
_MODEL_PARTS = tuple(sorted({folder for family in FAMILIES.values() for folder in family.encoder_folders}))


def _folder_fingerprint(folder: Path) -> dict:
    """A content hash of every small config/vocabulary file under ``folder`` and size + mtime of
    every weight file."""
    entries = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        if file.suffix in (".json", ".txt") and stat.st_size < (16 << 20):
            entries[str(file.relative_to(folder))] = sha256_of(file)
        else:
            entries[str(file.relative_to(folder))] = [stat.st_size, stat.st_mtime_ns]
    return entries


def as_source(source: Union[ModelSource, str, os.PathLike]) -> ModelSource:
    """``source`` itself, or a bare path / Hub id as the :class:`ModelSource` of that pipeline."""
    return source if isinstance(source, ModelSource) else ModelSource(str(source))


def model_fingerprint(source: ModelSource, modules: Sequence = ()) -> dict:
    """What the encodings depend on: the pipeline (a local folder: its resolved path and
    :func:`_folder_fingerprint` of its VAE, text encoder and tokenizer folders; a Hub id: the id
    and ``revision``), the ``variant``, the VAE of ``--pretrained_vae_model_name_or_path`` (a folder:
    its fingerprint; a Hub id: the id), and the configs of the passed ``modules`` when the
    pipeline is neither (modules built in memory)."""
    path = Path(source.path)
    out: dict = {"variant": source.variant}
    if source.vae_path is not None:
        vae = Path(source.vae_path)
        out["vae"] = source.vae_path
        if vae.is_dir():
            out["vae"] = {"path": str(vae.resolve()), "files": _folder_fingerprint(vae)}
    if path.is_dir():
        parts = {part: _folder_fingerprint(path / part) for part in _MODEL_PARTS if (path / part).is_dir()}
        return {**out, "path": str(path.resolve()), "parts": parts}
    configs = []
    for module in modules:
        config = getattr(module, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        configs.append(json.loads(json.dumps(config, sort_keys=True, default=str)))
    if configs:
        return {**out, "path": source.path, "configs": configs}
    return {**out, "hub_id": source.path, "revision": source.revision or "main"}


def cache_key(
    dataset: PreferenceDataset,
    source: Union[ModelSource, str, os.PathLike],
    *,
    dtype: torch.dtype = torch.float32,
    modules: Sequence = (),
    text_encoding: Optional[dict] = None,
) -> Tuple[str, dict]:
    """``(key, components)``: the key is the first 24 hex digits of the SHA-256 of the JSON of
    ``components`` (format version, dataset and model fingerprints, resolution, latent choice,
    encoding dtype, and the family's text-encoding settings ``text_encoding``, such as the flow
    families' ``max_sequence_length``, when it has any). ``source``: a :class:`ModelSource` (a
    bare path or Hub id: that pipeline at its default revision, no variant, its own VAE)."""
    components = {
        "format": CACHE_FORMAT,
        "dataset": dataset_fingerprint(dataset),
        "model": model_fingerprint(as_source(source), modules),
        "resolution": dataset.resolution,
        "preprocess": "resize-shorter-bilinear+center-crop",
        "latents": "posterior-mean",
        "dtype": str(dtype).replace("torch.", ""),
    }
    if text_encoding:  # only where the family has such settings: the SD families' keys stay as they were
        components["text_encoding"] = dict(text_encoding)
    blob = json.dumps(components, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], components
