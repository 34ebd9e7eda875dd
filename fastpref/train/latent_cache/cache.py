"""The latent cache itself: :class:`LatentCache` (built or opened, read memory-mapped) and
:class:`CachedPreferenceDataset`, which serves its tensors in place of pixels."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from ..data import PreferenceDataset, format_rows
from ..models import ModelSource
from . import building
from .building import CAPTIONS_FILE, META_FILE, Encoders, Processes, ShardPlan, shards
from .key import CACHE_FORMAT, as_source, cache_key
from .tensor_files import CacheFileError, check_latent_shard, check_text_shard, copy_tensor, read_tensors

logger = logging.getLogger(__name__)


class LatentCache:
    """VAE latents and text embeddings of a :class:`PreferenceDataset`, encoded once.

    ``LatentCache.build(dataset, cache_dir, source)`` opens ``cache_dir/<key>/`` when it is
    complete and whole (``hit=True``); otherwise it encodes what is missing and opens it
    (``hit=False``). The key is :func:`cache_key`: the dataset (its Arrow files, or the content
    of its rows) and columns, the model (folder contents, or Hub id and revision; variant; VAE),
    the resolution, the encoding dtype and the family's text-encoding settings (the flow families'
    ``max_sequence_length``) -- so a changed file, model or resolution gets a new
    folder, and anything else (another run, a resume, other ties / flips / subset) reuses it.

    Contents, per source row that passes the dataset's cheap checks (ties included, and in DeDPO
    mode the rows skipped only for a malformed judge value; a row that does not decode is listed
    in ``undecodable_rows`` instead), in stored order (``jpg_0``, ``jpg_1``; :meth:`view` puts
    the winner first): latents ``[2, C, R/8, R/8]`` = :func:`encode_images` (posterior mean,
    shifted and scaled), ``original_sizes``, ``crop_top_lefts [2, 2]``; per unique caption, the
    family's ``encode_prompts`` by name: ``prompt_embeds [77, D]`` and for SDXL
    ``pooled_prompt_embeds [P]``; SD3 / FLUX: T5's ``prompt_embeds [max_sequence_length, D]``,
    ``pooled_prompt_embeds [P]`` and SD3's ``clip_prompt_embeds [77, D']``;
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

    The VAE and text encoders are loaded from ``source`` only on a miss, unless passed in.
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
        return {k: copy_tensor(tensors[k][offset]) for k in ("latents", "original_sizes", "crop_top_lefts")}

    def text(self, index: int) -> Dict[str, torch.Tensor]:
        """The text conditioning of unique caption ``index`` by name (the family's
        ``encode_prompts`` names: ``prompt_embeds [L, D]``, for SDXL ``pooled_prompt_embeds [P]``)."""
        shard = int(np.searchsorted(self._text_starts, index, side="right")) - 1
        tensors = self._file(self.meta["text_shards"][shard])
        offset = index - int(self._text_starts[shard])
        return {name: copy_tensor(value[offset]) for name, value in tensors.items()}

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
        for name, start, stop in shards("latents", len(rows), meta["shard_size"]):
            check_latent_shard(folder / name, rows[start:stop])
        for name, start, stop in shards("text", meta["num_captions"], meta["shard_size"]):
            check_text_shard(folder / name, stop - start)
        if not np.array_equal(np.asarray(read_tensors(folder / CAPTIONS_FILE)["rows"]), rows):
            raise CacheFileError(f"{folder / CAPTIONS_FILE}: holds other rows than the cache's")
        return cls(folder, meta, hit=hit)

    @classmethod
    def _open_if_whole(cls, folder: Path) -> Optional["LatentCache"]:
        """The cache in ``folder`` if it is complete and every file checks out, else None."""
        if not (folder / META_FILE).exists():
            return None
        try:
            return cls.open(folder)
        except CacheFileError as error:
            logger.warning("latent cache %s is not whole (%s); completing it", folder, error)
            return None

    @classmethod
    def build(
        cls,
        dataset: PreferenceDataset,
        cache_dir,
        source: Union[ModelSource, str, os.PathLike],
        *,
        family=None,
        vae=None,
        tokenizers: Optional[Sequence] = None,
        text_encoders: Optional[Sequence] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        batch_size: int = 8,
        shard_size: int = 512,
        accelerator=None,
        progress: bool = True,
    ) -> "LatentCache":
        """Open ``cache_dir/<key>/`` if it is complete and whole, else encode what is missing into
        it. ``source``: a :class:`ModelSource` (a bare path or Hub id: that pipeline as it is);
        ``family``: its model family (default: ``source.family``). The encoders are loaded from
        ``source`` unless passed in; passed modules set ``dtype``. With ``accelerator``, every
        process of the run calls this together."""
        source = as_source(source)
        given = [m for m in [vae, *(text_encoders or [])] if m is not None]
        dtype = next(given[0].parameters()).dtype if given else dtype
        family = family if family is not None else source.family
        key, components = cache_key(dataset, source, dtype=dtype, modules=given, text_encoding=family.encoding_key())
        folder = Path(cache_dir) / key
        processes = Processes.of(accelerator)
        found = cls._open_if_whole(folder)
        processes.wait()
        if found is not None:
            logger.info("latent cache hit: %s (%d rows)", folder, len(found))
            return found
        processes.on_main(building.prepare_folder, folder, components)
        encoders = Encoders.load(family, source, vae, tokenizers, text_encoders, dtype=dtype, device=device)
        plan = ShardPlan.of(dataset, shard_size)
        latent_todo, text_todo = building.shards_to_encode(folder, plan, processes)
        building.encode_text_shards(folder, plan, text_todo, encoders, batch_size)
        building.encode_latent_shards(dataset, folder, plan, latent_todo, encoders, batch_size, progress, processes)
        processes.on_main(building.write_captions, folder, plan, encoders)
        processes.on_main(building.write_meta, folder, key, dataset, plan, encoders)
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
