"""The evaluation's statistics, per metric: each model's mean, its paired difference to the base
and its win rate against the base, each with a 95 % t-interval over prompts.

Scores are ``[P, S]`` arrays (prompts x seeds; seed ``j`` of prompt ``i`` is the same initial
noise for every model). The prompt is the unit: a model's per-prompt value is its mean over the
seeds, and every interval is a t-interval (:func:`fastpref.stats.mean_interval`, ``P - 1``
degrees of freedom) over the ``P`` per-prompt values, so that seeds of one prompt are not
counted as independent. The win rate's per-prompt value is the share of seeds on which the
tuned model scores above the base (a tie counts one half); its interval is clipped to [0, 1]."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from ..stats import mean_interval, paired_difference

LEVEL = 0.95


def as_matrix(values, name: str) -> np.ndarray:
    """``values`` as a float64 ``[P, S]`` array; ``ValueError`` naming ``name`` otherwise."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"{name}: scores must be [prompts, seeds], got shape {values.shape}")
    return values


def interval(summary: dict, low: Optional[float] = None, high: Optional[float] = None) -> dict:
    """``{"mean", "low", "high", "n"}`` of a :func:`~fastpref.stats.mean_interval` summary, the
    bounds clipped to ``[low, high]`` where given."""
    out = {"mean": summary["mean"], "low": summary["low"], "high": summary["high"], "n": summary["n"]}
    if out["low"] is not None and low is not None:
        out["low"] = max(out["low"], low)
    if out["high"] is not None and high is not None:
        out["high"] = min(out["high"], high)
    return out


def wins(tuned: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``[P, S]``: 1 where ``tuned`` scores above ``base``, 0.5 for a tie, 0 below."""
    return (tuned > base) + 0.5 * (tuned == base)


def compare(scores: Mapping[str, np.ndarray], base: str, level: float = LEVEL) -> Dict[str, dict]:
    """For one metric, ``scores``: model name -> ``[P, S]`` scores (same prompts and seeds).
    Returns, per model: ``mean`` (its per-prompt means' t-interval); and for every model but
    ``base``: ``difference`` (paired: model - base, per prompt) and ``win_rate``; each a dict
    ``{"mean", "low", "high", "n"}`` with ``n`` the number of prompts."""
    matrices = {name: as_matrix(values, name) for name, values in scores.items()}
    if base not in matrices:
        raise ValueError(f"base model {base!r} has no scores (models: {', '.join(matrices)})")
    reference = matrices[base]
    out = {}
    for name, values in matrices.items():
        if values.shape != reference.shape:
            raise ValueError(f"{name}: scores {values.shape} do not pair with the base's {reference.shape}")
        row = {"mean": interval(mean_interval(values.mean(axis=1), level))}
        if name != base:
            row["difference"] = interval(paired_difference(values.mean(axis=1), reference.mean(axis=1), level))
            row["win_rate"] = interval(mean_interval(wins(values, reference).mean(axis=1), level), 0.0, 1.0)
        out[name] = row
    return out
