"""The batch layout: :func:`collate_pairs` stacks B items into the trainer's ``[2B, ...]`` batch."""

from __future__ import annotations

from typing import Sequence

import torch

_BATCH_NAMES = {"caption": "captions"}
# Item fields that hold one entry per image ([2, ...]: winner, loser); batched as [2B, ...].
PER_IMAGE = ("pixel_values", "latents", "original_sizes", "crop_top_lefts")


def collate_pairs(items: Sequence[dict]) -> dict:
    """Stack B items into the trainer's batch.

    Per-image tensors (``pixel_values``, ``latents``, ``original_sizes``, ``crop_top_lefts``;
    ``[2, ...]`` per item) become ``[2B, ...]``: all B winners, then all B losers -- the layout
    that the UNet and ``fastpref.adaptive_dpo_loss`` take (diffusers' DPO script stacks the pair
    on channels, ``[B, 6, R, R]``, and its ``cat(chunk(2, dim=1))`` gives the same
    ``[2B, 3, R, R]``). Per-pair tensors (``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds``)
    stack to ``[B, ...]``; ``flipped``/``tie`` -> bool ``[B]``, ``human_label`` -> float32
    ``[B]``, ``index``/``row`` -> int64 ``[B]``, ``caption`` -> the list ``captions``. DeDPO
    items (``synthetic_labels=True``) add ``synthetic_label``, ``propensity`` -> float32 ``[B]``
    (``human_label`` float32 ``[B]`` with NaN where unlabelled) and ``human_mask`` -> bool
    ``[B]``: the keywords of ``adaptive_dpo_loss(..., loss_type="dedpo")``. ``skipped_rows``
    becomes one flat list of the rows passed over at fetch."""
    if not items:
        raise ValueError("collate_pairs needs at least one item")
    batch = {}
    for key, first in items[0].items():
        if key == "skipped_rows":  # the rows passed over at fetch, for BatchEncoder's count
            batch[key] = [row for item in items for row in item[key]]
            continue
        values = [item[key] for item in items]
        name = _BATCH_NAMES.get(key, key)
        if key in PER_IMAGE:
            batch[name] = torch.stack(values, dim=1).flatten(0, 1)  # [2, B, ...] -> [2B, ...]
        elif isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, bool):
            batch[name] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[name] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[name] = list(values)
    return batch
