"""The latent cache: VAE latents and text embeddings of a :class:`PreferenceDataset` encoded once
into ``cache_dir/<key>/``, keyed by the dataset, the model (folder or Hub id, revision, variant,
VAE) and the resolution, written in shards that an interrupted build resumes, read memory-mapped,
and served in place of pixels by :class:`CachedPreferenceDataset`."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..files import write_atomic, write_json_atomic
from .data import PreferenceDataset, decode_image, format_rows, preprocess
from .families import FAMILIES
from .models import ModelSource

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
CAPTIONS_FILE = "captions.safetensors"
META_FILE = "meta.json"


class CacheFileError(ValueError):
    """A cache file that is truncated, unreadable or does not hold what the cache expects."""


# --------------------------------------------------------------------------------------------
# the key
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(dataset: PreferenceDataset) -> dict:
    """What the cached rows depend on: the ``datasets`` fingerprint of the split (for parquet
    files it follows their paths and modification times; for a ``save_to_disk`` folder, its
    saved state), the split, its row count and the columns read. Not ties, flips or the subset:
    those apply on top of the cache."""
    return {
        "fingerprint": getattr(dataset.data, "_fingerprint", None),
        "split": dataset.split,
        "num_rows": dataset.num_rows,
        "columns": dataset.columns,
    }


# The pipeline folders the encodings may depend on: every family's (a family's own are a subset).
_MODEL_PARTS = tuple(sorted({folder for family in FAMILIES.values() for folder in family.encoder_folders}))


def _folder_fingerprint(folder: Path) -> dict:
    """A content hash of every small config/vocabulary file under ``folder`` and size + mtime of
    every weight file."""
    entries = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        if file.suffix in (".json", ".txt") and stat.st_size < (16 << 20):
            entries[str(file.relative_to(folder))] = _sha256_file(file)
        else:
            entries[str(file.relative_to(folder))] = [stat.st_size, stat.st_mtime_ns]
    return entries


def _source(source, revision=None, variant=None, vae_path=None) -> ModelSource:
    """``source`` as a :class:`ModelSource` (a path or Hub id with the other three)."""
    return source if isinstance(source, ModelSource) else ModelSource(str(source), revision, variant, vae_path)


def model_fingerprint(source: ModelSource, modules: Sequence = ()) -> dict:
    """What the encodings depend on: the pipeline (a local folder: its resolved path and
    :func:`_folder_fingerprint` of its VAE, text encoder and tokenizer folders; a Hub id: the id
    and ``revision``), the ``variant``, the VAE of ``--pretrained_vae_model_name_or_path`` (a folder:
    its fingerprint; a Hub id: the id), and the configs of the passed ``modules`` when the
    pipeline is neither (modules built in memory)."""
    model_path, revision, variant, vae_path = source.path, source.revision, source.variant, source.vae_path
    path = Path(str(model_path))
    out: dict = {"variant": variant}
    if vae_path is not None:
        vae = Path(str(vae_path))
        out["vae"] = {"path": str(vae.resolve()), "files": _folder_fingerprint(vae)} if vae.is_dir() else str(vae_path)
    if path.is_dir():
        parts = {part: _folder_fingerprint(path / part) for part in _MODEL_PARTS if (path / part).is_dir()}
        return {**out, "path": str(path.resolve()), "parts": parts}
    configs = []
    for module in modules:
        config = getattr(module, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        configs.append(json.loads(json.dumps(config, sort_keys=True, default=str)))
    if configs:
        return {**out, "path": str(model_path), "configs": configs}
    return {**out, "hub_id": str(model_path), "revision": revision or "main"}


def cache_key(
    dataset: PreferenceDataset,
    source,
    *,
    dtype: torch.dtype = torch.float32,
    modules: Sequence = (),
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    vae_path: Optional[str] = None,
) -> Tuple[str, dict]:
    """``(key, components)``: the key is the first 24 hex digits of the SHA-256 of the JSON of
    ``components`` (format version, dataset and model fingerprints, resolution, latent choice,
    encoding dtype). ``source``: a :class:`ModelSource`, or a path / Hub id read at ``revision``
    with ``variant`` and ``vae_path``."""
    components = {
        "format": CACHE_FORMAT,
        "dataset": dataset_fingerprint(dataset),
        "model": model_fingerprint(_source(source, revision, variant, vae_path), modules),
        "resolution": dataset.resolution,
        "preprocess": "resize-shorter-bilinear+center-crop",
        "latents": "posterior-mean",
        "dtype": str(dtype).replace("torch.", ""),
    }
    blob = json.dumps(components, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], components


# --------------------------------------------------------------------------------------------
# files: safetensors written atomically, read memory-mapped
# --------------------------------------------------------------------------------------------

_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


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


def _save_tensors(tensors: Dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    write_atomic(file, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A writable torch copy of a (memory-mapped) array."""
    return torch.from_numpy(np.array(array))


def _rows_to_encode(dataset: PreferenceDataset) -> np.ndarray:
    """Every row that passed the dataset's cheap checks, whether or not it decoded them up front
    (``check_images``), so that the cache's contents do not depend on that switch: the rows that
    do not decode are recorded as undecodable. Rows skipped only for a malformed judge value
    (DeDPO mode) are encoded too: the key does not depend on the mode, so a cache built in DeDPO
    mode must serve a plain dataset of the same files as well."""
    rows = np.union1d(dataset.valid_rows, np.asarray(dataset.skipped["undecodable"], dtype=np.int64))
    return np.union1d(rows, np.asarray(dataset.judge_malformed_rows, dtype=np.int64)).astype(np.int64)


def _shards(prefix: str, count: int, shard_size: int) -> List[Tuple[str, int, int]]:
    """``(file name, first, stop)`` of each shard of ``count`` entries (one, empty, for none)."""
    starts = range(0, max(count, 1), shard_size)
    return [(f"{prefix}-{n:05d}.safetensors", s, min(s + shard_size, count)) for n, s in enumerate(starts)]


def _refuse_non_finite(values: torch.Tensor, rows: Sequence[int], what: str) -> None:
    """``ValueError`` naming the rows whose entries of ``values [N, ...]`` are NaN or Inf."""
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if bool(bad.any()):
        named = [rows[i] for i in torch.nonzero(bad).flatten().tolist()]
        raise ValueError(
            f"latent cache: {what} of row(s) {format_rows(sorted(set(named)))} hold NaN or Inf; refusing to cache "
            "them. The VAE / text encoder overflows in this precision: run with --mixed_precision no, or name an "
            "fp16-safe VAE with --pretrained_vae_model_name_or_path"
        )


# --------------------------------------------------------------------------------------------
# encoding one shard
# --------------------------------------------------------------------------------------------


def _encode_rows(dataset: PreferenceDataset, rows: np.ndarray, family, vae, batch_size: int, progress=None) -> dict:
    """Latents (posterior mean), original sizes and crops of the pairs in ``rows`` (stored
    order), ``batch_size`` images per VAE call; rows whose images do not decode are listed in
    ``undecodable_rows`` instead. Non-finite latents raise (:func:`_refuse_non_finite`)."""
    kept, failed, latents, sizes, crops = [], [], [], [], []
    batch: List[torch.Tensor] = []
    batch_rows: List[int] = []

    def flush():
        if batch:
            encoded = family.encode_images(vae, torch.cat(batch), batch_size).float().cpu()
            pairs = encoded.reshape(-1, 2, *encoded.shape[1:])
            _refuse_non_finite(pairs, batch_rows, "the latents")
            latents.append(pairs)
            batch.clear()
            batch_rows.clear()

    for row in rows.tolist():
        try:
            pair = [preprocess(decode_image(dataset.image_data(row, w)), dataset.resolution) for w in (0, 1)]
        except Exception:  # noqa: BLE001 - undecodable rows are recorded, not fatal
            failed.append(row)
            continue
        finally:
            if progress is not None:
                progress.update(1)
        kept.append(row)
        batch.append(torch.stack([p[0] for p in pair]))
        batch_rows.append(row)
        sizes.append([p[1] for p in pair])
        crops.append([p[2] for p in pair])
        if 2 * len(batch) >= batch_size:
            flush()
    flush()
    if failed:
        logger.warning("latent cache: %d undecodable rows skipped: %s", len(failed), format_rows(failed))
    if latents:
        stacked = torch.cat(latents)
    else:
        probe = family.encode_images(vae, torch.zeros(1, 3, dataset.resolution, dataset.resolution)).float().cpu()
        stacked = probe.new_zeros((0, 2, *probe.shape[1:]))
    return {
        "rows": torch.tensor(kept, dtype=torch.int64),
        "latents": stacked,
        "original_sizes": torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2, 2),
        "crop_top_lefts": torch.tensor(crops, dtype=torch.int64).reshape(-1, 2, 2),
        "undecodable_rows": torch.tensor(failed, dtype=torch.int64),
    }


def _encode_captions(captions: Sequence[str], family, tokenizers, text_encoders, batch_size: int, rows: Sequence[int]):
    """The family's text conditioning of ``captions``, ``batch_size`` at a time, by name
    (``[N, ...]`` float32 each; NaN or Inf refused naming ``rows``, each caption's first row)."""
    parts: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(captions), batch_size):
        for name, value in family.encode_prompts(
            captions[start : start + batch_size], tokenizers, text_encoders
        ).items():
            parts.setdefault(name, []).append(value.float().cpu())
    empty = family.encode_prompts([""], tokenizers, text_encoders)
    out = {name: torch.cat(parts[name]) if name in parts else value.float().cpu()[:0] for name, value in empty.items()}
    for name, value in out.items():
        _refuse_non_finite(value, rows, "the text embeddings")
    return out


def _check_latent_shard(file: Path, expected: np.ndarray) -> None:
    """:class:`CacheFileError` unless ``file`` is whole and covers exactly the rows ``expected``."""
    tensors = read_tensors(file)
    missing = {"rows", "latents", "original_sizes", "crop_top_lefts", "undecodable_rows"} - set(tensors)
    if missing:
        raise CacheFileError(f"{file}: no tensor(s) {sorted(missing)}")
    covered = np.union1d(np.asarray(tensors["rows"]), np.asarray(tensors["undecodable_rows"]))
    if not np.array_equal(covered, expected) or len(tensors["latents"]) != len(tensors["rows"]):
        raise CacheFileError(f"{file}: holds other rows than this shard's (a mismatched cache file)")


def _check_text_shard(file: Path, count: int) -> None:
    tensors = read_tensors(file)
    if "prompt_embeds" not in tensors or len(tensors["prompt_embeds"]) != count:
        raise CacheFileError(f"{file}: does not hold the {count} caption embeddings of this shard")


def _valid(check, file: Path, *args) -> bool:
    """Whether a shard written before can be kept; a bad one is logged and removed."""
    if not file.exists():
        return False
    try:
        check(file, *args)
        return True
    except CacheFileError as error:
        logger.warning("latent cache: %s; encoding it again", error)
        file.unlink(missing_ok=True)
        return False


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------


class LatentCache:
    """VAE latents and text embeddings of a :class:`PreferenceDataset`, encoded once.

    ``LatentCache.build(dataset, cache_dir, source)`` opens ``cache_dir/<key>/`` when it is
    complete and whole (``hit=True``); otherwise it encodes what is missing and opens it
    (``hit=False``). The key is :func:`cache_key`: the dataset's fingerprint and columns, the model
    (folder contents, or Hub id and revision; variant; VAE), the resolution and the encoding dtype
    -- so a changed file, model or resolution gets a new folder, and anything else (another run,
    a resume, other ties / flips / subset) reuses it.

    Contents, per source row that passes the dataset's cheap checks (ties included, and in DeDPO
    mode the rows skipped only for a malformed judge value; a row that does not decode is listed
    in ``undecodable_rows`` instead), in stored order (``jpg_0``, ``jpg_1``; :meth:`view` puts
    the winner first): latents ``[2, 4, R/8, R/8]`` = :func:`encode_images` (posterior mean x
    scaling factor), ``original_sizes``, ``crop_top_lefts [2, 2]``; per unique caption:
    ``prompt_embeds [77, D]`` and for SDXL ``pooled_prompt_embeds [P]`` (:func:`encode_prompts`);
    each row's caption index; and the encoding of the empty caption. All float32 by default, in
    safetensors files: ``captions.safetensors`` (rows, caption index, empty caption),
    ``text-0000k.safetensors`` and ``latents-0000k.safetensors`` (``shard_size`` captions / rows
    each) and ``meta.json`` (written last; its presence marks the cache complete).

    * **Batches**: the VAE encodes ``batch_size`` images per call (``--vae_encode_batch_size``).
    * **Processes**: with ``accelerator`` (several processes), process ``p`` encodes the shards
      ``k`` with ``k % num_processes == p``; the main process writes ``meta.json`` once all are
      there, and every process then opens the cache.
    * **Resume**: every shard is written atomically, so an interrupted build leaves whole shards
      only; the next build keeps the shards that check out and encodes the rest.
    * **Checked**: every file is checked against its safetensors header (size) and the rows it
      must hold, when built and when opened; a truncated or mismatched file is removed and
      encoded again, never served. Latents or embeddings with NaN or Inf are refused with
      ``ValueError`` naming the rows (an fp16 VAE overflowing, typically).
    * **Memory-mapped**: shards are read through :func:`read_tensors`; an item copies only its
      own latents and embedding.

    The VAE and text encoders are loaded from ``source`` (``revision``, ``variant``,
    ``vae_path``) only on a miss, unless passed in.
    """

    def __init__(self, path: Path, meta: dict, hit: bool):
        self.path = Path(path)
        self.meta = meta
        self.key = meta["key"]
        self.hit = hit
        self.family = meta.get("family", meta.get("arch"))  # the family's name ("arch" in caches of 0.1.0)
        captions = read_tensors(self.path / CAPTIONS_FILE)
        rows, undecodable, counts = [], [], []
        for name in meta["shards"]:
            shard = read_tensors(self.path / name)
            rows.append(np.array(shard["rows"]))
            undecodable += np.asarray(shard["undecodable_rows"]).tolist()
            counts.append(len(shard["rows"]))
        self.rows = torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros(0, dtype=torch.int64)
        self.undecodable_rows = sorted(undecodable)
        self._shard_starts = np.cumsum([0] + counts)
        text_counts = [len(read_tensors(self.path / name)["prompt_embeds"]) for name in meta["text_shards"]]
        self._text_starts = np.cumsum([0] + text_counts)
        text_rows = torch.from_numpy(np.array(captions["rows"]))
        caption_index = torch.from_numpy(np.array(captions["caption_index"]))
        self.caption_index = caption_index[torch.searchsorted(text_rows, self.rows)] if len(self.rows) else self.rows
        self._maps: Dict[str, Dict[str, np.ndarray]] = {}

    def __getstate__(self):  # DataLoader workers map the files themselves
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def _file(self, name: str) -> Dict[str, np.ndarray]:
        if name not in self._maps:
            self._maps[name] = read_tensors(self.path / name)
        return self._maps[name]

    def pair(self, position: int) -> Dict[str, torch.Tensor]:
        """``latents [2, C, h, w]``, ``original_sizes``, ``crop_top_lefts [2, 2]`` of the
        ``position``-th cached row (stored order), copied out of the memory map."""
        shard = int(np.searchsorted(self._shard_starts, position, side="right")) - 1
        tensors = self._file(self.meta["shards"][shard])
        offset = position - int(self._shard_starts[shard])
        return {k: _tensor(tensors[k][offset]) for k in ("latents", "original_sizes", "crop_top_lefts")}

    def text(self, index: int) -> Dict[str, torch.Tensor]:
        """The text conditioning of unique caption ``index`` by name (the family's
        ``encode_prompts`` names: ``prompt_embeds [L, D]``, for SDXL ``pooled_prompt_embeds [P]``)."""
        shard = int(np.searchsorted(self._text_starts, index, side="right")) - 1
        tensors = self._file(self.meta["text_shards"][shard])
        offset = index - int(self._text_starts[shard])
        return {name: _tensor(value[offset]) for name, value in tensors.items()}

    def _all(self, names: Sequence[str], key: str) -> Optional[torch.Tensor]:
        parts = [self._file(name).get(key) for name in names]
        return None if any(p is None for p in parts) else torch.cat([_tensor(p) for p in parts])

    @property
    def latents(self) -> torch.Tensor:
        """Every cached latent pair, ``[N, 2, C, h, w]``, read into memory (small caches only)."""
        return self._all(self.meta["shards"], "latents")

    @property
    def prompt_embeds(self) -> torch.Tensor:
        """Every unique caption's embedding, ``[U, L, D]``, read into memory (small caches only)."""
        return self._all(self.meta["text_shards"], "prompt_embeds")

    @property
    def pooled_prompt_embeds(self) -> Optional[torch.Tensor]:
        """SDXL's pooled embeddings ``[U, P]`` (None for SD 1.5), read into memory."""
        return self._all(self.meta["text_shards"], "pooled_prompt_embeds")

    @classmethod
    def open(cls, folder: Path, hit: bool = True) -> "LatentCache":
        """The complete cache in ``folder``, every file checked (:class:`CacheFileError` if one
        is torn or missing, or ``meta.json`` is not this folder's)."""
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError) as error:
            raise CacheFileError(f"{folder / META_FILE}: unreadable ({error})") from None
        if meta.get("key") != folder.name or meta.get("format") != CACHE_FORMAT:
            raise CacheFileError(f"{folder / META_FILE}: written for another key or format")
        rows = np.asarray(meta["rows"], dtype=np.int64)
        for name, start, stop in _shards("latents", len(rows), meta["shard_size"]):
            _check_latent_shard(folder / name, rows[start:stop])
        for name, start, stop in _shards("text", meta["num_captions"], meta["shard_size"]):
            _check_text_shard(folder / name, stop - start)
        if not np.array_equal(np.asarray(read_tensors(folder / CAPTIONS_FILE)["rows"]), rows):
            raise CacheFileError(f"{folder / CAPTIONS_FILE}: holds other rows than the cache's")
        return cls(folder, meta, hit=hit)

    @classmethod
    def build(
        cls,
        dataset: PreferenceDataset,
        cache_dir,
        source,
        *,
        family=None,
        vae=None,
        tokenizers: Optional[Sequence] = None,
        text_encoders: Optional[Sequence] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        batch_size: int = 8,
        shard_size: int = 512,
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        vae_path: Optional[str] = None,
        accelerator=None,
        progress: bool = True,
    ) -> "LatentCache":
        """Open ``cache_dir/<key>/`` if it is complete and whole, else encode what is missing into
        it. ``source``: a :class:`ModelSource` (or a path / Hub id with ``revision``, ``variant``,
        ``vae_path``); ``family``: its model family (default: the one that recognises it). The
        encoders are loaded from ``source`` unless passed in; passed modules set ``dtype``. With
        ``accelerator``, every process of the run calls this together."""
        given = [m for m in [vae, *(text_encoders or [])] if m is not None]
        if given:
            dtype = next(given[0].parameters()).dtype
        source = _source(source, revision, variant, vae_path)
        key, components = cache_key(dataset, source, dtype=dtype, modules=given)
        folder = Path(cache_dir) / key
        world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
        barrier = accelerator.wait_for_everyone if accelerator else (lambda: None)

        found: Optional[LatentCache] = None
        if (folder / META_FILE).exists():
            try:
                found = cls.open(folder)
            except CacheFileError as error:
                logger.warning("latent cache %s is not whole (%s); completing it", folder, error)
        barrier()
        if found is not None:
            logger.info("latent cache hit: %s (%d rows)", folder, len(found))
            return found
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / META_FILE).unlink(missing_ok=True)
            write_json_atomic(folder / "key.json", components)
        barrier()

        family = family if family is not None else source.family
        if vae is None or text_encoders is None or tokenizers is None:
            loaded_vae, loaded_tok, loaded_te = family.load_encoders(source, dtype=dtype, device=device)
            vae = vae if vae is not None else loaded_vae
            tokenizers = tokenizers if tokenizers is not None else loaded_tok
            text_encoders = text_encoders if text_encoders is not None else loaded_te
        rows = _rows_to_encode(dataset)
        unique: Dict[str, int] = {}
        caption_index, first_row = [], []  # each row's caption; each caption's first row
        for row in rows.tolist():
            caption = dataset.caption(row)
            if caption not in unique:
                unique[caption] = len(unique)
                first_row.append(row)
            caption_index.append(unique[caption])
        captions = list(unique)
        latent_shards = _shards("latents", len(rows), shard_size)
        text_shards = _shards("text", len(captions), shard_size)
        mine_latents = [s for k, s in enumerate(latent_shards) if k % world == rank]
        mine_text = [s for k, s in enumerate(text_shards) if k % world == rank]
        todo = [s for s in mine_latents if not _valid(_check_latent_shard, folder / s[0], rows[s[1] : s[2]])]
        todo_text = [s for s in mine_text if not _valid(_check_text_shard, folder / s[0], s[2] - s[1])]
        logger.info(
            "latent cache miss: %d rows in %d shards into %s; this process encodes %d of them (%d done before)",
            len(rows),
            len(latent_shards),
            folder,
            len(todo),
            len(mine_latents) - len(todo),
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(stop - start for _, start, stop in todo),
            desc="caching latents",
            unit="pair",
            disable=not progress or (accelerator is not None and not accelerator.is_local_main_process),
        )
        with bar:
            for name, start, stop in todo_text:
                encoded = _encode_captions(
                    captions[start:stop], family, tokenizers, text_encoders, batch_size, first_row[start:stop]
                )
                _save_tensors(encoded, folder / name)
            for name, start, stop in todo:
                _save_tensors(_encode_rows(dataset, rows[start:stop], family, vae, batch_size, bar), folder / name)
        if rank == 0:
            small = {
                "rows": torch.as_tensor(rows, dtype=torch.int64),
                "caption_index": torch.tensor(caption_index, dtype=torch.int64),
            }
            for name, value in family.encode_prompts([""], tokenizers, text_encoders).items():
                small[f"empty_{name}"] = value.float().cpu()
            _save_tensors(small, folder / CAPTIONS_FILE)
        barrier()
        if rank == 0:
            meta = {
                "key": key,
                "format": CACHE_FORMAT,
                "family": family.name,
                "resolution": dataset.resolution,
                "num_rows": int(len(rows)),
                "rows": rows.tolist(),
                "num_captions": len(captions),
                "shard_size": shard_size,
                "shards": [name for name, _, _ in latent_shards],
                "text_shards": [name for name, _, _ in text_shards],
                "scaling_factor": float(vae.config.scaling_factor),
                "latents": "posterior mean x scaling_factor",
            }
            write_json_atomic(folder / META_FILE, meta)  # last: its presence marks the cache complete
        barrier()
        cache = cls.open(folder, hit=False)
        cache.meta["num_cached"] = len(cache)
        return cache

    def view(self, dataset: PreferenceDataset) -> "CachedPreferenceDataset":
        """The dataset serving cached latents in place of pixels (see :class:`CachedPreferenceDataset`)."""
        return CachedPreferenceDataset(dataset, self)


class CachedPreferenceDataset(torch.utils.data.Dataset):
    """``dataset`` with :class:`LatentCache` tensors in place of decoded pixels.

    Same length, order, winner-first rule, ties and flips as ``dataset`` (rows the cache found
    undecodable are dropped first, as :meth:`PreferenceDataset.without_rows` does). Item (key
    ``i`` or ``(i, position)``; no random crop or flip applies): ``latents [2, C, h, w]`` (winner
    first), ``prompt_embeds [L, D]``, for SDXL ``pooled_prompt_embeds [P]``, ``original_sizes``,
    ``crop_top_lefts [2, 2]``, ``skipped_rows`` (empty) and the fields of
    :meth:`PreferenceDataset.item_info` (``caption``, ``flipped``, ``tie``, ``human_label``,
    ``index``, ``row``; in DeDPO mode also ``synthetic_label``, ``human_mask``, ``propensity``,
    and the judge's order).
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

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key
        item = self.dataset.item_info(index)
        position = int(self._position[item["index"]])
        order = [1, 0] if item.pop("swap") else [0, 1]
        for name, value in self.cache.pair(position).items():
            item[name] = value[order]
        item.update(self.cache.text(int(self.cache.caption_index[position])))
        item["skipped_rows"] = []
        return item
