"""Statistics shared by the demo and the evaluation: mean and std over seeds, t-intervals of a mean and of paired
(per-seed) differences, the AUROC of a score for a binary label (ties counted one half), and
the share of positives per bin of a score (the paper's Fig. 3)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

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


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (``df >= 1``),
    by bisection on its CDF, integrated numerically (Simpson, 4001 points; error < 1e-7): hand-
    written so that one quantile does not make scipy a dependency of the demo."""
    if not 0.0 < probability < 1.0 or df < 1:
        raise ValueError(f"need 0 < probability < 1 and df >= 1, got {probability} and {df}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        simpson = (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum()) * (grid[1] - grid[0]) / 3
        return 0.5 + simpson

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if cdf(mid) < probability else (low, mid)
    return 0.5 * (low + high)


def mean_interval(values: Sequence[float], level: float = 0.95) -> Dict[str, Optional[float]]:
    """Mean and two-sided ``level`` t-interval of the mean of ``values`` (``n - 1`` degrees of
    freedom): ``{"mean", "low", "high", "std", "n"}``; the interval is None for a single value."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean, std = mean_std(values)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "std": std, "n": n}
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "std": std, "n": n}


def paired_difference(values: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict:
    """The per-seed differences ``values - baseline`` (equal length, seed-aligned): their
    :func:`mean_interval` plus ``differences`` and ``excludes_zero`` (whether the interval lies
    entirely above or below zero; None without an interval)."""
    values, baseline = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape:
        raise ValueError(f"paired values need the same seeds, got {values.shape} and {baseline.shape}")
    out = mean_interval(values - baseline, level)
    out["differences"] = [float(d) for d in values - baseline]
    out["excludes_zero"] = None if out["low"] is None else bool(out["low"] > 0 or out["high"] < 0)
    return out


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], level: float = 0.95) -> dict:
    """The ratio of the means of two paired samples, ``mean(a) / mean(b)`` (per-seed values
    ``a``, ``b`` of equal length), with Fieller's ``level`` interval: the ratios R for which
    the paired t-test of ``mean(a - R b) = 0`` does not reject (``n - 1`` degrees of freedom).
    Hand-written, as :func:`t_quantile`. Returns ``{"mean", "low", "high", "n", "bounded"}``;
    when ``mean(b)`` is not itself distinguishable from zero at ``level`` the set is unbounded
    (``bounded`` False, ``low`` and ``high`` None), and so is ``mean`` when ``mean(b)`` is 0."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need the same seeds, got {a.shape} and {b.shape}")
    n = len(a)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    out = {"mean": mean_a / mean_b if mean_b != 0 else None, "low": None, "high": None, "n": n, "bounded": False}
    if n < 2:
        return out
    t2 = t_quantile(0.5 + level / 2, n - 1) ** 2 / n
    covariance = np.cov(a, b, ddof=1)
    s_aa, s_ab, s_bb = float(covariance[0, 0]), float(covariance[0, 1]), float(covariance[1, 1])
    # (mean_a - R mean_b)^2 <= t2 (s_aa - 2 R s_ab + R^2 s_bb): q2 R^2 - 2 q1 R + q0 <= 0
    q2, q1, q0 = mean_b**2 - t2 * s_bb, mean_a * mean_b - t2 * s_ab, mean_a**2 - t2 * s_aa
    discriminant = q1 * q1 - q2 * q0
    if q2 <= 0 or discriminant < 0:
        return out
    root = math.sqrt(discriminant)
    out.update(low=(q1 - root) / q2, high=(q1 + root) / q2, bounded=True)
    return out
