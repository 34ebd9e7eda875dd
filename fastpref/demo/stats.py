"""The study's statistics: mean and std over seeds, the AUROC of a score for a binary label
(ties counted one half), and the share of positives per bin of a score (the paper's Fig. 3)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (float64 ``[N]``), tied values sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = 0.5 * (start + end) + 1.0
        start = end + 1
    return ranks


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` vs the rest: the probability
    that a random positive scores above a random negative, ties counting one half (the
    Mann-Whitney U statistic over ``n_pos * n_neg``). Raises ``ValueError`` when a class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores and positive must be 1-d of the same length, got {scores.shape} and {positive.shape}")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs at least one positive and one negative")
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def flipped_ratio_per_bin(
    u: np.ndarray, flipped: np.ndarray, edges: np.ndarray
) -> Tuple[List[int], List[Optional[float]]]:
    """Fig. 3: for bins ``[edges[i], edges[i+1])`` (the last one closed), the number of pairs
    and the share of flipped pairs among them (``None`` for an empty bin)."""
    u = np.asarray(u, dtype=np.float64)
    flipped = np.asarray(flipped, dtype=bool)
    index = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, len(edges) - 2)
    counts, ratios = [], []
    for i in range(len(edges) - 1):
        inside = index == i
        counts.append(int(inside.sum()))
        ratios.append(float(flipped[inside].mean()) if inside.any() else None)
    return counts, ratios


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
