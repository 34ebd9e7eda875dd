"""Building the latent cache: the steps :meth:`LatentCache.build` runs on a miss -- plan the
shards, split them across processes, keep the whole ones written before, encode the rest,
write the caption table and, last, ``meta.json``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ...files import write_json_atomic
from ..data import PreferenceDataset, decode_image, format_rows, preprocess
from .key import CACHE_FORMAT, rows_to_encode
from .tensor_files import check_latent_shard, check_text_shard, keep_shard, save_tensors

logger = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.safetensors"
META_FILE = "meta.json"

Shard = Tuple[str, int, int]  # (file name, first entry, stop)


def shards(prefix: str, count: int, shard_size: int) -> List[Shard]:
    """The shards of ``count`` entries, in a fixed order (one, empty, for none)."""
    starts = range(0, max(count, 1), shard_size)
    return [(f"{prefix}-{n:05d}.safetensors", s, min(s + shard_size, count)) for n, s in enumerate(starts)]


@dataclass(frozen=True)
class Processes:
    """The processes that build the cache together: ``count`` of them, this one ``rank``."""

    count: int = 1
    rank: int = 0
    wait: Callable[[], None] = lambda: None
    shows_progress: bool = True

    @classmethod
    def of(cls, accelerator=None) -> "Processes":
        if accelerator is None:
            return cls()
        return cls(
            accelerator.num_processes,
            accelerator.process_index,
            accelerator.wait_for_everyone,
            accelerator.is_local_main_process,
        )

    def mine(self, all_shards: Sequence[Shard]) -> List[Shard]:
        """This process's share of ``all_shards``: handed round-robin, shard ``k`` to rank ``k % count``."""
        return [s for k, s in enumerate(all_shards) if k % self.count == self.rank]

    def on_main(self, step: Callable, *args) -> None:
        """``step(*args)`` on the main process only, then every process waits for it."""
        if self.rank == 0:
            step(*args)
        self.wait()


@dataclass
class Encoders:
    """The family and the modules that encode the cache: a VAE, tokenizers and text encoders."""

    family: object
    vae: torch.nn.Module
    tokenizers: Sequence
    text_encoders: Sequence

    @classmethod
    def load(cls, family, source, vae=None, tokenizers=None, text_encoders=None, **load_kwargs) -> "Encoders":
        """The modules passed in, the missing ones loaded from ``source`` by ``family``."""
        if vae is None or text_encoders is None or tokenizers is None:
            loaded_vae, loaded_tok, loaded_te = family.load_encoders(source, **load_kwargs)
            vae = vae if vae is not None else loaded_vae
            tokenizers = tokenizers if tokenizers is not None else loaded_tok
            text_encoders = text_encoders if text_encoders is not None else loaded_te
        return cls(family, vae, tokenizers, text_encoders)

    def prompts(self, captions: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The family's text conditioning of ``captions``, float32 on the CPU, by name."""
        encoded = self.family.encode_prompts(list(captions), self.tokenizers, self.text_encoders)
        return {name: value.float().cpu() for name, value in encoded.items()}


@dataclass
class ShardPlan:
    """What the cache holds and in which files: the rows to encode (``int64 [N]``, ascending), the
    unique captions (deduplicated: each is encoded once), each row's caption index, each
    caption's first row, and the shards of ``shard_size`` rows / captions."""

    shard_size: int
    rows: np.ndarray
    captions: List[str]
    caption_index: List[int]
    first_row: List[int]
    latent_shards: List[Shard]
    text_shards: List[Shard]

    @classmethod
    def of(cls, dataset: PreferenceDataset, shard_size: int) -> "ShardPlan":
        rows = rows_to_encode(dataset)
        unique: Dict[str, int] = {}
        caption_index, first_row = [], []
        for row in rows.tolist():
            caption = dataset.caption(row)
            if caption not in unique:
                unique[caption] = len(unique)
                first_row.append(row)
            caption_index.append(unique[caption])
        latent_shards = shards("latents", len(rows), shard_size)
        text_shards = shards("text", len(unique), shard_size)
        return cls(shard_size, rows, list(unique), caption_index, first_row, latent_shards, text_shards)


def refuse_non_finite(values: torch.Tensor, rows: Sequence[int], what: str) -> None:
    """``ValueError`` naming the rows whose entries of ``values [N, ...]`` are NaN or Inf."""
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if bool(bad.any()):
        named = [rows[i] for i in torch.nonzero(bad).flatten().tolist()]
        raise ValueError(
            f"latent cache: {what} of row(s) {format_rows(sorted(set(named)))} hold NaN or Inf; refusing to cache "
            "them. The VAE / text encoder overflows in this precision: run with --mixed_precision no, or name an "
            "fp16-safe VAE with --pretrained_vae_model_name_or_path"
        )


def _encode_rows(dataset: PreferenceDataset, rows: np.ndarray, encoders: Encoders, batch_size: int, progress) -> dict:
    """Latents (posterior mean) ``[n, 2, C, h, w]`` float32, original sizes and crops
    ``[n, 2, 2]`` int64 of the pairs in ``rows`` (stored order), ``batch_size`` images per VAE
    call; rows whose images do not decode are listed in ``undecodable_rows`` instead. Non-finite
    latents raise (:func:`refuse_non_finite`)."""
    family, vae = encoders.family, encoders.vae
    kept, failed, latents, sizes, crops = [], [], [], [], []
    batch: List[torch.Tensor] = []
    batch_rows: List[int] = []

    def flush():
        if batch:
            encoded = family.encode_images(vae, torch.cat(batch), batch_size).float().cpu()
            pairs = encoded.reshape(-1, 2, *encoded.shape[1:])
            refuse_non_finite(pairs, batch_rows, "the latents")
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


def _encode_captions(captions: Sequence[str], encoders: Encoders, batch_size: int, rows: Sequence[int]) -> dict:
    """The text conditioning of ``captions``, ``batch_size`` at a time, by name (``[U, ...]``
    float32 each; NaN or Inf refused naming ``rows``, each caption's first row)."""
    parts: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(captions), batch_size):
        for name, value in encoders.prompts(captions[start : start + batch_size]).items():
            parts.setdefault(name, []).append(value)
    empty = encoders.prompts([""])
    out = {name: torch.cat(parts[name]) if name in parts else value[:0] for name, value in empty.items()}
    for value in out.values():
        refuse_non_finite(value, rows, "the text embeddings")
    return out


def prepare_folder(folder: Path, components: dict) -> None:
    """The folder, without a ``meta.json`` (the cache is incomplete until it is written again),
    with ``key.json``: what the key was hashed from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)
    write_json_atomic(folder / "key.json", components)


def shards_to_encode(folder: Path, plan: ShardPlan, processes: Processes) -> Tuple[List[Shard], List[Shard]]:
    """This process's latent and text shards that are missing or do not check out (those are
    removed); the whole ones an interrupted build wrote are kept."""
    mine, mine_text = processes.mine(plan.latent_shards), processes.mine(plan.text_shards)
    latents = [s for s in mine if not keep_shard(check_latent_shard, folder / s[0], plan.rows[s[1] : s[2]])]
    texts = [s for s in mine_text if not keep_shard(check_text_shard, folder / s[0], s[2] - s[1])]
    logger.info(
        "latent cache miss: %d rows in %d shards into %s; this process encodes %d of them (%d done before)",
        len(plan.rows),
        len(plan.latent_shards),
        folder,
        len(latents),
        len(mine) - len(latents),
    )
    return latents, texts


def encode_text_shards(folder: Path, plan: ShardPlan, todo: Sequence[Shard], encoders: Encoders, batch_size: int):
    """Each shard of ``todo``: the embeddings of its unique captions, written atomically."""
    for name, start, stop in todo:
        encoded = _encode_captions(plan.captions[start:stop], encoders, batch_size, plan.first_row[start:stop])
        save_tensors(encoded, folder / name)


def encode_latent_shards(
    dataset: PreferenceDataset,
    folder: Path,
    plan: ShardPlan,
    todo: Sequence[Shard],
    encoders: Encoders,
    batch_size: int,
    progress: bool,
    processes: Processes,
) -> None:
    """Each shard of ``todo``: the latents of its rows, written atomically (a kill between two
    shards leaves the finished ones), with a progress bar of pairs on the local main process."""
    from tqdm.auto import tqdm

    total = sum(stop - start for _, start, stop in todo)
    bar = tqdm(total=total, desc="caching latents", unit="pair", disable=not (progress and processes.shows_progress))
    with bar:
        for name, start, stop in todo:
            save_tensors(_encode_rows(dataset, plan.rows[start:stop], encoders, batch_size, bar), folder / name)


def write_captions(folder: Path, plan: ShardPlan, encoders: Encoders) -> None:
    """``captions.safetensors``: the rows, each row's caption index and the empty caption's encoding."""
    small = {
        "rows": torch.as_tensor(plan.rows, dtype=torch.int64),
        "caption_index": torch.tensor(plan.caption_index, dtype=torch.int64),
    }
    for name, value in encoders.prompts([""]).items():
        small[f"empty_{name}"] = value
    save_tensors(small, folder / CAPTIONS_FILE)


def write_meta(folder: Path, key: str, dataset: PreferenceDataset, plan: ShardPlan, encoders: Encoders) -> None:
    """``meta.json``, written last: its presence marks the cache complete."""
    meta = {
        "key": key,
        "format": CACHE_FORMAT,
        "family": encoders.family.name,
        "resolution": dataset.resolution,
        "num_rows": int(len(plan.rows)),
        "rows": plan.rows.tolist(),
        "num_captions": len(plan.captions),
        "shard_size": plan.shard_size,
        "shards": [name for name, _, _ in plan.latent_shards],
        "text_shards": [name for name, _, _ in plan.text_shards],
        "scaling_factor": float(encoders.vae.config.scaling_factor),
        "latents": "posterior mean x scaling_factor",
    }
    write_json_atomic(folder / META_FILE, meta)
