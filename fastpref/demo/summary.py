"""The study's results (``results.json``) from the records of its runs: the label-flip table,
Adaptive-DPO's metric u on flipped and kept pairs (AUROC, weights, the paper's Fig. 3 bins), the
structured minority and the DeDPO comparison."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from . import world as tw
from .config import DEDPO_ARMS, FLIP_RATES, METHODS, STRUCTURED_METHODS, U_BINS, StudyConfig
from .stats import auroc, flipped_ratio_per_bin, mean_std


def summarize(records: Sequence[dict], world: tw.World, study: StudyConfig) -> dict:
    """The results dictionary (``results.json``) from every run's record."""
    base = float(world.base_reward["mean"])
    out: dict = {
        "flip_rates": list(FLIP_RATES),
        "seeds": study.seeds,
        "base_reward": base,
        "base_reward_per_colour": world.base_reward["per_colour"],
    }
    out.update(flip_table(records, base))
    out.update(metric_auroc(records))
    out["adaptive_metric"] = metric_by_label(records)
    out["u_bins"] = u_bins(records)
    out["structured"] = structured(records, world)
    out["dedpo"] = dedpo(records, world, study)
    return out


def find(records: Sequence[dict], study: str, method: str, rate: int = 0) -> List[dict]:
    """The records of one arm, by seed."""
    return sorted(
        (r for r in records if r["study"] == study and r["method"] == method and r["rate"] == rate),
        key=lambda r: r["seed"],
    )


def _with_metric(records: Sequence[dict], study: str, method: str, rate: int = 0) -> List[dict]:
    """The records of one arm that logged the metric u (per pair, after the warm-up)."""
    return [r for r in find(records, study, method, rate) if r.get("u") is not None]


def _pooled(runs: Sequence[dict], key: str) -> np.ndarray:
    """One per-pair array (``u``, ``weight``, ``flipped``, ``member``) over all ``runs``."""
    return np.concatenate([r[key] for r in runs])


def flip_table(records: Sequence[dict], base: float) -> dict:
    """Reward (mean and std over seeds), gain over the base model and share of clean DPO's gain
    kept, per method and flip rate, with clean DPO's gain."""
    clean_gain = mean_std([r["reward"] for r in find(records, "flip", "dpo", 0)])[0] - base
    reward, reward_std, gain, retained = {}, {}, {}, {}
    for method in METHODS:
        reward[method], reward_std[method], gain[method], retained[method] = {}, {}, {}, {}
        for rate in FLIP_RATES:
            m, s = mean_std([r["reward"] for r in find(records, "flip", method, rate)])
            reward[method][str(rate)], reward_std[method][str(rate)] = m, s
            gain[method][str(rate)] = m - base
            retained[method][str(rate)] = (m - base) / clean_gain if clean_gain > 0 else None
    return {
        "clean_dpo_gain": clean_gain,
        "reward": reward,
        "reward_std": reward_std,
        "gain": gain,
        "retained_share_of_clean_dpo_gain": retained,
    }


def metric_auroc(records: Sequence[dict]) -> dict:
    """AUROC of u for flipped vs kept pairs (mean and std over seeds) per flip rate, for
    Adaptive-DPO (``auroc_u_flipped``) and Adaptive-IPO (``auroc_u_flipped_adaptive_ipo``)."""
    out = {}
    for method, key in (("adaptive", "auroc_u_flipped"), ("adaptive-ipo", "auroc_u_flipped_adaptive_ipo")):
        out[key], out[key + "_std"] = {}, {}
        for rate in FLIP_RATES[1:]:
            values = [auroc(r["u"], r["flipped"]) for r in _with_metric(records, "flip", method, rate)]
            out[key][str(rate)], out[key + "_std"][str(rate)] = mean_std(values) if values else (None, None)
    return out


def _mean(values: np.ndarray) -> Optional[float]:
    return float(values.mean()) if len(values) else None


def _quantiles(values: np.ndarray) -> Optional[List[float]]:
    return [float(q) for q in np.quantile(values, [0.1, 0.5, 0.9])] if len(values) else None


def metric_by_label(records: Sequence[dict]) -> Dict[str, dict]:
    """Adaptive-DPO's mean u, mean weight W and W's 10/50/90 % quantiles on kept and on flipped
    pairs per flip rate (all seeds, every step after the warm-up)."""
    out = {}
    for rate in FLIP_RATES:
        runs = _with_metric(records, "flip", "adaptive", rate)
        if not runs:
            continue
        w, u = _pooled(runs, "weight"), _pooled(runs, "u")
        f = _pooled(runs, "flipped").astype(bool)
        out[str(rate)] = {
            "weight_kept": _mean(w[~f]),
            "weight_flipped": _mean(w[f]),
            "u_kept": _mean(u[~f]),
            "u_flipped": _mean(u[f]),
            "weight_quantiles_kept": _quantiles(w[~f]),
            "weight_quantiles_flipped": _quantiles(w[f]),
        }
    return out


def u_bins(records: Sequence[dict]) -> dict:
    """The paper's Fig. 3: per flip rate, ``U_BINS`` equal-count bins of Adaptive-DPO's u (all
    seeds, every step after the warm-up), their edges, pair counts and shares of flipped pairs."""
    bins: dict = {
        "binning": f"{U_BINS} bins of equal count (quantiles of u) per flip rate; "
        "Adaptive-DPO runs, all seeds, every step after the warm-up"
    }
    for rate in FLIP_RATES[1:]:
        runs = _with_metric(records, "flip", "adaptive", rate)
        if not runs:
            continue
        u, f = _pooled(runs, "u"), _pooled(runs, "flipped")
        edges = np.unique(np.quantile(u, np.linspace(0.0, 1.0, U_BINS + 1)))
        if len(edges) < 2:
            edges = np.array([u.min(), u.max() + 1e-12])
        counts, ratios = flipped_ratio_per_bin(u, f, edges)
        bins[str(rate)] = {"edges": [float(e) for e in edges], "count": counts, "flipped_ratio": ratios}
    return bins


def structured(records: Sequence[dict], world: tw.World) -> dict:
    """The structured minority: its labels, each method's reward (held-out prompts; held-out
    prompts of the minority's colour and of the others; every prompt of the minority's colour)
    and Adaptive-DPO's metric on the minority."""
    colour = world.config.minority_colour
    member, swapped = tw.structured_minority(world.pairs, world.config)
    out = {
        "minority_colour": colour,
        "criterion": "the minority prefers the brighter image (higher mean brightness)",
        "minority_share_of_pairs": float(member.float().mean()),
        "minority_labels_against_reward": float(swapped[member].float().mean()) if member.any() else None,
        "base_reward_minority_colour": world.base_reward["per_colour"].get(colour),
    }
    out.update(structured_rewards(records, colour))
    out["auroc_u_against_reward"] = None
    out.update(structured_metric(records))
    out["base_reward_minority_colour_all_prompts"] = world.base_reward.get("minority_colour_all_prompts")
    return out


def structured_rewards(records: Sequence[dict], colour: str) -> dict:
    """Mean and std over seeds of each structured method's reward on the held-out prompts, on
    those of ``colour`` and of the other colours, and on every prompt of ``colour``."""
    keys = ("reward", "reward_minority_colour", "reward_other_colours", "reward_minority_colour_all_prompts")
    out: dict = {}
    for key in keys:
        out[key], out[key + "_std"] = {}, {}
    other = [c for c in tw.colour_names() if c != colour]
    for method in STRUCTURED_METHODS:
        runs = find(records, "structured", method)
        if not runs:
            continue
        values = {
            "reward": [r["reward"] for r in runs],
            "reward_minority_colour": [r["per_colour"][colour] for r in runs],
            "reward_other_colours": [
                np.mean([r["per_colour"][c] for c in other if c in r["per_colour"]]) for r in runs
            ],
            "reward_minority_colour_all_prompts": [r["minority_colour_all_prompts"] for r in runs],
        }
        for key in keys:
            out[key][method], out[key + "_std"][method] = mean_std(values[key])
    return out


def structured_metric(records: Sequence[dict]) -> dict:
    """Adaptive-DPO on the structured minority: the AUROC of u for labels against the reward and
    for minority membership, and the mean weight W of minority and majority pairs."""
    runs = _with_metric(records, "structured", "adaptive")
    if not runs:
        return {}
    u = _pooled(runs, "u")
    f = _pooled(runs, "flipped").astype(bool)
    m = _pooled(runs, "member").astype(bool)
    out = {}
    if f.any() and (~f).any():
        out["auroc_u_against_reward"] = auroc(u, f)
    if m.any() and (~m).any():
        w = _pooled(runs, "weight")
        out["auroc_u_minority_member"] = auroc(u, m)
        out["weight_minority"] = float(w[m].mean())
        out["weight_majority"] = float(w[~m].mean())
    return out


def dedpo(records: Sequence[dict], world: tw.World, study: StudyConfig) -> dict:
    """The DeDPO comparison: the judge's accuracy (seed 0's noise) and the reward of each arm;
    the all-human arm is the clean DPO run of the flip study (same seed, pairs, order, steps)."""
    judge, biased = tw.synthetic_judge(world.pairs, world.config, biased_colours=study.judge_biased_colours, seed=0)
    right = judge > 0.5
    out = {
        "human_fraction": study.human_fraction,
        "propensity": study.human_fraction,
        "judge": {
            "biased_colours": list(study.judge_biased_colours),
            "strength": 2.0,
            "noise": 1.0,
            "accuracy_seed0": float(right.float().mean()),
            "accuracy_on_biased_prompts_seed0": float(right[biased].float().mean()) if biased.any() else None,
            "accuracy_elsewhere_seed0": float(right[~biased].float().mean()) if (~biased).any() else None,
        },
        "reward": {},
        "reward_std": {},
        "note": "all-human is the clean DPO run of the flip study (same seed, pairs, order and steps)",
    }
    for arm in DEDPO_ARMS:
        runs = find(records, "flip", "dpo", 0) if arm == "all-human" else find(records, "dedpo", arm)
        if runs:
            out["reward"][arm], out["reward_std"][arm] = mean_std([r["reward"] for r in runs])
    return out
