"""The latent cache: VAE latents and text embeddings of a :class:`PreferenceDataset` encoded once
into ``cache_dir/<key>/``, keyed by fingerprints of the data files, the model and the resolution,
and served in place of pixels by :class:`CachedPreferenceDataset`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .arch import detect_arch
from .data import (
    PreferenceDataset,
    decode_image,
    encode_images,
    encode_prompts,
    format_rows,
    load_encoders,
    preprocess,
)
from .files import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_fingerprint(path: Path, window: int = 1 << 20) -> dict:
    """Size, mtime and a hash of the first and last ``window`` bytes (cheap for huge files)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(window))
        if stat.st_size > window:
            handle.seek(max(window, stat.st_size - window))
            digest.update(handle.read(window))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_tail_sha256": digest.hexdigest()}


def dataset_fingerprint(dataset: PreferenceDataset) -> dict:
    """What the cached rows depend on: the files (relative name, size, mtime, head/tail hash)
    and the columns read. Not ties, flips or max_pairs: those apply on top of the cache."""
    root = dataset.source if dataset.source.is_dir() else dataset.source.parent
    files = []
    for file in dataset.files:
        try:
            name = str(file.relative_to(root))
        except ValueError:
            name = file.name
        files.append(dict(name=name, **_file_fingerprint(file)))
    return {"files": files, "columns": dataset.columns}


_MODEL_PARTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def model_fingerprint(model_path, modules: Sequence = ()) -> dict:
    """What the encodings depend on. For a local pipeline folder: its resolved path and, for the
    VAE, text encoder and tokenizer folders, a content hash of every small config/vocabulary file
    and size + mtime of every weight file. Otherwise: the name and the passed modules' configs."""
    path = Path(model_path)
    if path.is_dir():
        parts = {}
        for part in _MODEL_PARTS:
            folder = path / part
            if not folder.is_dir():
                continue
            entries = {}
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                stat = file.stat()
                if file.suffix in (".json", ".txt") and stat.st_size < (16 << 20):
                    entries[str(file.relative_to(folder))] = _sha256_file(file)
                else:
                    entries[str(file.relative_to(folder))] = [stat.st_size, stat.st_mtime_ns]
            parts[part] = entries
        return {"path": str(path.resolve()), "parts": parts}
    configs = []
    for module in modules:
        config = getattr(module, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        configs.append(json.loads(json.dumps(config, sort_keys=True, default=str)))
    if not configs:
        raise ValueError(f"model_path {model_path} is not a local folder: pass vae and text_encoders to key the cache")
    return {"path": str(model_path), "configs": configs}


def cache_key(
    dataset: PreferenceDataset, model_path, *, dtype: torch.dtype = torch.float32, modules: Sequence = ()
) -> Tuple[str, dict]:
    """``(key, components)``: the key is the first 24 hex digits of the SHA-256 of the JSON of
    ``components`` (format version, dataset and model fingerprints, resolution, latent choice,
    encoding dtype)."""
    components = {
        "format": CACHE_FORMAT,
        "dataset": dataset_fingerprint(dataset),
        "model": model_fingerprint(model_path, modules),
        "resolution": dataset.resolution,
        "preprocess": "resize-shorter-bilinear+center-crop",
        "latents": "posterior-mean",
        "dtype": str(dtype).replace("torch.", ""),
    }
    blob = json.dumps(components, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], components


def _arch(model_path, text_encoders) -> str:
    if Path(model_path).is_dir():
        return detect_arch(model_path)
    return "sdxl" if text_encoders is not None and len(text_encoders) == 2 else "sd15"


def _rows_to_encode(dataset: PreferenceDataset) -> np.ndarray:
    """Every row that passed the dataset's cheap checks, whether or not it decoded them up front
    (``check_images``), so that the cache's contents do not depend on that switch: the rows that
    do not decode are recorded as undecodable. Rows skipped only for a malformed judge value
    (DeDPO mode) are encoded too: the key does not depend on the mode, so a cache built in DeDPO
    mode must serve a plain dataset of the same files as well."""
    rows = np.union1d(dataset.valid_rows, np.asarray(dataset.skipped["undecodable"], dtype=np.int64))
    return np.union1d(rows, np.asarray(dataset.judge_malformed_rows, dtype=np.int64)).astype(np.int64)


def _shards(num_rows: int, shard_size: int) -> List[Tuple[str, int]]:
    """``(file name, first row)`` of each shard (one, empty, for no rows)."""
    return [(f"latents-{n:05d}.safetensors", start) for n, start in enumerate(range(0, max(num_rows, 1), shard_size))]


def _save_tensors(tensors: Dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    write_atomic(file, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def _write_text(dataset, rows: np.ndarray, tokenizers, text_encoders, file: Path, batch_size: int) -> None:
    """One text embedding per unique caption of ``rows`` (in order of first appearance), each
    row's caption index, and the empty caption's embedding (for caption dropout); kept if the
    file exists (an interrupted build resumes)."""
    if file.exists():
        return
    unique: Dict[str, int] = {}
    index = [unique.setdefault(dataset.caption(int(r)), len(unique)) for r in rows]
    captions = list(unique)
    embeds, pooled = [], []
    for start in range(0, len(captions), batch_size):
        e, p = encode_prompts(captions[start : start + batch_size], tokenizers, text_encoders)
        embeds.append(e.float().cpu())
        if p is not None:
            pooled.append(p.float().cpu())
    empty, empty_pooled = encode_prompts([""], tokenizers, text_encoders)
    tensors = {
        "rows": torch.as_tensor(rows, dtype=torch.int64),
        "caption_index": torch.tensor(index, dtype=torch.int64),
        "prompt_embeds": torch.cat(embeds) if embeds else empty.float().cpu()[:0],
        "empty_prompt_embeds": empty.float().cpu(),
    }
    if empty_pooled is not None:
        tensors["pooled_prompt_embeds"] = torch.cat(pooled) if pooled else empty_pooled.float().cpu()[:0]
        tensors["empty_pooled_prompt_embeds"] = empty_pooled.float().cpu()
    _save_tensors(tensors, file)


def _write_shard(dataset, rows: np.ndarray, vae, file: Path, batch_size: int) -> str:
    """Encode ``rows`` into the shard ``file`` unless it exists; returns its name."""
    if not file.exists():
        _save_tensors(_encode_rows(dataset, rows, vae, batch_size), file)
    return file.name


def _encode_rows(dataset: PreferenceDataset, rows: np.ndarray, vae, batch_size: int) -> Dict[str, torch.Tensor]:
    """Latents (posterior mean), original sizes and crops of the pairs in ``rows``; rows whose
    images do not decode are listed in ``undecodable_rows`` instead."""
    kept, failed, latents, sizes, crops = [], [], [], [], []
    batch: List[torch.Tensor] = []

    def flush():
        if batch:
            encoded = encode_images(vae, torch.cat(batch)).float().cpu()
            latents.append(encoded.reshape(-1, 2, *encoded.shape[1:]))
            batch.clear()

    for row in rows.tolist():
        try:
            pair = [preprocess(decode_image(dataset.image_data(row, w)), dataset.resolution) for w in (0, 1)]
        except Exception:  # noqa: BLE001 - undecodable rows are recorded, not fatal
            failed.append(row)
            continue
        kept.append(row)
        batch.append(torch.stack([p[0] for p in pair]))
        sizes.append([p[1] for p in pair])
        crops.append([p[2] for p in pair])
        if len(batch) == batch_size:
            flush()
    flush()
    if failed:
        logger.warning("latent cache: %d undecodable rows skipped: %s", len(failed), format_rows(failed))
    if latents:
        stacked = torch.cat(latents)
    else:
        probe = encode_images(vae, torch.zeros(1, 3, dataset.resolution, dataset.resolution)).float().cpu()
        stacked = probe.new_zeros((0, 2, *probe.shape[1:]))
    return {
        "rows": torch.tensor(kept, dtype=torch.int64),
        "latents": stacked,
        "original_sizes": torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2, 2),
        "crop_top_lefts": torch.tensor(crops, dtype=torch.int64).reshape(-1, 2, 2),
        "undecodable_rows": torch.tensor(failed, dtype=torch.int64),
    }


class LatentCache:
    """VAE latents and text embeddings of a :class:`PreferenceDataset`, encoded once.

    ``LatentCache.build(dataset, cache_dir, model_path)`` looks for ``cache_dir/<key>/meta.json``
    and loads it (``hit=True``); otherwise it encodes and writes it (``hit=False``). The key is
    :func:`cache_key`: a hash of the dataset files (size, mtime and a head/tail content hash of
    each), the model (its path, config/tokenizer file hashes, weight sizes and mtimes), the
    resolution and the encoding dtype -- so a changed file, model or resolution gets a new
    folder, and anything else (another run, a resume, other ``keep_ties``/``flip_rate``/
    ``max_pairs``) reuses it.

    Contents, per source row that passes the dataset's cheap checks (ties included, and in DeDPO
    mode the rows skipped only for a malformed judge value; a row that does not decode is
    listed in ``undecodable_rows`` instead), in stored order
    (``jpg_0``, ``jpg_1``; :meth:`view` puts the winner first): ``latents [N, 2, 4, R/8, R/8]``
    = :func:`encode_images` (posterior mean x scaling factor), ``original_sizes``,
    ``crop_top_lefts [N, 2, 2]``; per unique caption: ``prompt_embeds [U, 77, D]`` and for SDXL
    ``pooled_prompt_embeds [U, P]`` (:func:`encode_prompts`), ``caption_index [N]``; and the
    encoding of the empty caption (``empty_prompt_embeds``...) for caption dropout. All float32
    by default, safetensors files: ``text.safetensors``, ``latents-00000.safetensors`` ... (one
    per ``shard_size`` rows; an interrupted build resumes at the first missing shard) and
    ``meta.json`` (written last; its presence marks the cache complete). Files are written
    atomically, so a reader never sees half a file.

    The VAE and text encoders are loaded from ``model_path`` only on a miss, unless passed in.
    With several processes (accelerate), build on the main process first, then on the others
    (they hit).
    """

    def __init__(self, path: Path, meta: dict, hit: bool):
        from safetensors.torch import load_file

        self.path = Path(path)
        self.meta = meta
        self.key = meta["key"]
        self.hit = hit
        text = load_file(str(self.path / "text.safetensors"))
        self.prompt_embeds = text["prompt_embeds"]
        self.pooled_prompt_embeds = text.get("pooled_prompt_embeds")
        self.empty_prompt_embeds = text["empty_prompt_embeds"][0]
        self.empty_pooled_prompt_embeds = (
            text["empty_pooled_prompt_embeds"][0] if "empty_pooled_prompt_embeds" in text else None
        )
        text_rows = text["rows"]
        caption_index = text["caption_index"]
        shards = [load_file(str(self.path / name)) for name in meta["shards"]]
        self.rows = torch.cat([s["rows"] for s in shards])
        self.latents = torch.cat([s["latents"] for s in shards])
        self.original_sizes = torch.cat([s["original_sizes"] for s in shards])
        self.crop_top_lefts = torch.cat([s["crop_top_lefts"] for s in shards])
        self.undecodable_rows = torch.cat([s["undecodable_rows"] for s in shards]).tolist()
        self.caption_index = caption_index[torch.searchsorted(text_rows, self.rows)]
        self.arch = meta["arch"]

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def build(
        cls,
        dataset: PreferenceDataset,
        cache_dir,
        model_path,
        *,
        vae=None,
        tokenizers: Optional[Sequence] = None,
        text_encoders: Optional[Sequence] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        batch_size: int = 8,
        shard_size: int = 1024,
    ) -> "LatentCache":
        """Load ``cache_dir/<key>/`` if it is complete, else encode the dataset into it (the
        encoders are loaded from ``model_path`` unless passed in; passed modules set ``dtype``)."""
        given = [m for m in [vae, *(text_encoders or [])] if m is not None]
        if given:
            dtype = next(given[0].parameters()).dtype
        key, components = cache_key(dataset, model_path, dtype=dtype, modules=given)
        folder = Path(cache_dir) / key
        meta_file = folder / "meta.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            logger.info("latent cache hit: %s (%d rows)", folder, meta["num_cached"])
            return cls(folder, meta, hit=True)

        arch = _arch(model_path, text_encoders)
        if vae is None or text_encoders is None or tokenizers is None:
            loaded_vae, loaded_tok, loaded_te = load_encoders(model_path, arch, dtype=dtype, device=device)
            vae = vae if vae is not None else loaded_vae
            tokenizers = tokenizers if tokenizers is not None else loaded_tok
            text_encoders = text_encoders if text_encoders is not None else loaded_te
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(components, folder / "key.json")
        rows = _rows_to_encode(dataset)
        logger.info("latent cache miss: encoding %d rows into %s", len(rows), folder)
        _write_text(dataset, rows, tokenizers, text_encoders, folder / "text.safetensors", batch_size)
        shards = [
            _write_shard(dataset, rows[start : start + shard_size], vae, folder / name, batch_size)
            for name, start in _shards(len(rows), shard_size)
        ]
        meta = {
            "key": key,
            "arch": arch,
            "resolution": dataset.resolution,
            "num_rows": int(len(rows)),
            "shards": shards,
            "scaling_factor": float(vae.config.scaling_factor),
            "latents": "posterior mean x scaling_factor",
        }
        cache = cls(folder, dict(meta, num_cached=0), hit=False)
        meta["num_cached"] = len(cache)
        meta["undecodable_rows"] = cache.undecodable_rows
        write_json_atomic(meta, meta_file)  # last: its presence marks the cache complete
        cache.meta = meta
        return cache

    def view(self, dataset: PreferenceDataset) -> "CachedPreferenceDataset":
        """The dataset serving cached latents in place of pixels (see :class:`CachedPreferenceDataset`)."""
        return CachedPreferenceDataset(dataset, self)


class CachedPreferenceDataset(torch.utils.data.Dataset):
    """``dataset`` with :class:`LatentCache` tensors in place of decoded pixels.

    Same length, order, winner-first rule, ties and flips as ``dataset`` (rows the cache found
    undecodable are dropped first, as :meth:`PreferenceDataset.without_rows` does, when the
    dataset was built with ``check_images=False``). Item: ``latents [2, C, h, w]`` (winner
    first), ``prompt_embeds [L, D]``, for SDXL ``pooled_prompt_embeds [P]``, ``original_sizes``,
    ``crop_top_lefts [2, 2]``, and the fields of :meth:`PreferenceDataset.item_info` (``caption``,
    ``flipped``, ``tie``, ``human_label``, ``index``, ``row``; in DeDPO mode also
    ``synthetic_label``, ``human_mask``, ``propensity``, and the judge's order).
    """

    def __init__(self, dataset: PreferenceDataset, cache: LatentCache):
        if cache.meta.get("resolution", dataset.resolution) != dataset.resolution:
            raise ValueError(f"cache is for resolution {cache.meta['resolution']}, dataset for {dataset.resolution}")
        if cache.undecodable_rows:
            dataset = dataset.without_rows(cache.undecodable_rows, "undecodable")
        self.dataset = dataset
        self.cache = cache
        rows = torch.as_tensor(dataset.rows, dtype=torch.int64)
        position = torch.searchsorted(cache.rows, rows).clamp(max=max(len(cache.rows) - 1, 0))
        if len(rows) and (len(cache.rows) == 0 or not torch.equal(cache.rows[position], rows)):
            missing = rows[cache.rows[position] != rows] if len(cache.rows) else rows
            raise KeyError(f"rows {format_rows(missing.tolist())} are not in the latent cache {cache.path}")
        self._position = position

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset.item_info(index)
        position = int(self._position[item["index"]])
        order = [1, 0] if item.pop("swap") else [0, 1]
        cache = self.cache
        item["latents"] = cache.latents[position][order]
        item["original_sizes"] = cache.original_sizes[position][order]
        item["crop_top_lefts"] = cache.crop_top_lefts[position][order]
        text = int(cache.caption_index[position])
        item["prompt_embeds"] = cache.prompt_embeds[text]
        if cache.pooled_prompt_embeds is not None:
            item["pooled_prompt_embeds"] = cache.pooled_prompt_embeds[text]
        return item
