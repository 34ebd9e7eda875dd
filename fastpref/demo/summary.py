"""The study's results (``results.json``) from the records of its runs: the headline budget, the
label-flip table with 95 % intervals and paired (per-seed) differences, Adaptive-DPO's metric u
(AUROC, weights, the paper's Fig. 3 bins), the learning curves with u's diagnostics, the
ablations of u and the DeDPO comparison at each propensity."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..stats import auroc, flipped_ratio_per_bin, mean_interval, mean_std, paired_difference, ratio_interval
from . import labels, paper
from . import world as tw
from .config import (
    ABLATION_DEFAULT,
    ABLATION_RATE,
    ABLATIONS,
    METHODS,
    REAL_METHODS,
    U_BINS,
    StudyConfig,
)
from .runs import flipped_share

CURVE_KEYS = (
    "reward",
    "implicit_acc_kept",
    "implicit_acc_flipped",
    "l_rms",
    "auroc_minus_l_flipped",
    "auroc_u_flipped",
    "auroc_confidence_flipped",
    "auroc_stability_flipped",
    "grad_share_flipped",
    "u_kept",
    "u_flipped",
    "weight_kept",
    "weight_flipped",
)


def summarize(records: Sequence[dict], world: tw.World, study: StudyConfig, budget: Optional[dict] = None) -> dict:
    """The results dictionary (``results.json``) from every run's record; ``budget`` (from
    :func:`choose_budget`) when the study measured its budget (``--full``)."""
    base = float(world.base_reward["mean"])
    table = [r for r in records if r["reward"] is not None]
    rates = sorted({r["rate"] for r in table if r["study"] == "flip"})
    out: dict = {
        "flip_rates": rates,
        "seeds": study.seeds,
        "steps": study.steps if budget is None else budget["steps"],
        "base_reward": base,
        "base_reward_per_colour": world.base_reward["per_colour"],
    }
    if budget is not None:
        out["budget"] = budget
    out.update(flip_table(table, base, rates))
    out["paired_vs_dpo"] = paired_vs_dpo(table, rates)
    out["oracle_share"] = oracle_share(table, rates)
    out["diagnostics"] = diagnostics(table, rates)
    out["paper_comparison"] = paper_comparison(table, base, rates)
    out.update(metric_auroc(table, rates))
    out["adaptive_metric"] = metric_by_label(table, rates)
    out["u_bins"] = u_bins(table, rates)
    curves = learning_curves(records)
    if curves:
        out["curves"] = curves
    if any(r["study"] == "ablation" for r in table):
        out["ablation"] = ablation(table)
    if any(r["study"] == "dedpo" for r in table):
        out["dedpo"] = dedpo(table, world, study)
    return out


def find(records: Sequence[dict], study: str, method: str, rate: int = 0, variant: Optional[str] = None) -> List[dict]:
    """The records of one arm, by seed."""
    return sorted(
        (
            r
            for r in records
            if r["study"] == study and r["method"] == method and r["rate"] == rate and r.get("variant") == variant
        ),
        key=lambda r: r["seed"],
    )


def arm(records: Sequence[dict], method: str, rate: int) -> List[dict]:
    """The label-flip study's runs of one method and rate, by seed; the oracle at 0 % flips is
    DPO's runs (with no flipped pair it trains on every pair: it is DPO)."""
    if method == "oracle" and rate == 0:
        method = "dpo"
    return find(records, "flip", method, rate)


def _rewards(runs: Sequence[dict]) -> List[float]:
    return [r["reward"] for r in runs]


def _with_metric(runs: Sequence[dict]) -> List[dict]:
    """The runs that logged the metric u (per pair, after the warm-up)."""
    return [r for r in runs if r.get("u") is not None]


def _pooled(runs: Sequence[dict], key: str) -> np.ndarray:
    """One per-pair array (``u``, ``weight``, ``flipped``) over all ``runs``."""
    return np.concatenate([r[key] for r in runs])


def choose_budget(records: Sequence[dict]) -> dict:
    """The headline budget from DPO's learning curves at 0 % label flips (and nothing else): the
    curve step (not 0) where their mean over seeds peaks. Returns ``{"steps", "rule", "curve"}``, the
    curve as ``{"step": [...], "mean": [...], "low": [...], "high": [...]}``."""
    runs = [r for r in records if r["study"] == "flip" and r["method"] == "dpo" and r["rate"] == 0 and r.get("curve")]
    if not runs:
        raise ValueError("no DPO learning curve at 0 % label flips to choose the budget from")
    curve = _curve_of(runs, "reward")
    peak = int(np.argmax(curve["mean"][1:])) + 1
    return {
        "steps": int(curve["step"][peak]),
        "rule": "the step where DPO's mean learning curve at 0 % flips peaks (curve evaluation, "
        f"{len(runs)} seeds); every table's run then takes that many steps",
        "curve": curve,
    }


def _curve_of(runs: Sequence[dict], key: str) -> dict:
    """Mean and 95 % t-interval over runs of one curve quantity at every curve step (None where absent)."""
    steps = [p["step"] for p in runs[0]["curve"]]
    out: Dict[str, list] = {"step": steps, "mean": [], "low": [], "high": []}
    for i in range(len(steps)):
        values = [r["curve"][i].get(key) for r in runs]
        values = [v for v in values if v is not None]
        summary = mean_interval(values) if values else {"mean": None, "low": None, "high": None}
        for name in ("mean", "low", "high"):
            out[name].append(summary[name])
    return out


def learning_curves(records: Sequence[dict]) -> Dict[str, dict]:
    """Every curve arm (method x label-flip rate; DPO at 0 % are the budget runs): each of
    :data:`CURVE_KEYS` against the step, mean and 95 % interval over seeds."""
    out: Dict[str, dict] = {}
    for method in METHODS:
        for rate in sorted({r["rate"] for r in records if r.get("curve")}):
            runs = [r for r in arm(records, method, rate) if r.get("curve")]
            if runs:
                out.setdefault(method, {})[str(rate)] = {key: _curve_of(runs, key) for key in CURVE_KEYS}
    return out


def flip_table(records: Sequence[dict], base: float, rates: Sequence[int]) -> dict:
    """Reward (mean, std and 95 % interval over seeds), gain over the base model and share of
    clean DPO's gain kept, per method and label-flip rate, with clean DPO's gain."""
    clean_gain = mean_std(_rewards(arm(records, "dpo", 0)))[0] - base
    reward, reward_std, interval, gain, retained = {}, {}, {}, {}, {}
    for method in METHODS:
        reward[method], reward_std[method], interval[method], gain[method], retained[method] = {}, {}, {}, {}, {}
        for rate in rates:
            summary = mean_interval(_rewards(arm(records, method, rate)))
            m, key = summary["mean"], str(rate)
            reward[method][key], reward_std[method][key] = m, summary["std"]
            interval[method][key] = [summary["low"], summary["high"]]
            gain[method][key] = m - base
            retained[method][key] = (m - base) / clean_gain if clean_gain > 0 else None
    return {
        "clean_dpo_gain": clean_gain,
        "reward": reward,
        "reward_std": reward_std,
        "reward_interval95": interval,
        "gain": gain,
        "retained_share_of_clean_dpo_gain": retained,
    }


def paired_vs_dpo(records: Sequence[dict], rates: Sequence[int]) -> Dict[str, dict]:
    """Per method other than DPO (the oracle included) and label-flip rate: the per-seed reward
    differences method - DPO (same seed: same pairs, order, label flips and noise) with their mean
    and 95 % t-interval."""
    out: Dict[str, dict] = {}
    for method in METHODS[1:]:
        out[method] = {}
        for rate in rates:
            out[method][str(rate)] = paired_difference(
                _rewards(arm(records, method, rate)), _rewards(arm(records, "dpo", rate))
            )
    return out


def oracle_share(records: Sequence[dict], rates: Sequence[int]) -> Dict[str, dict]:
    """Per real method and label-flip rate > 0: the share of the oracle's gain over DPO that the
    method recovers, ``mean(method - DPO) / mean(oracle - DPO)`` over seeds, with Fieller's 95 %
    interval for paired samples (:func:`fastpref.stats.ratio_interval`); 1 = all of the
    oracle's gain, 0 = none."""
    out: Dict[str, dict] = {}
    for method in REAL_METHODS:
        out[method] = {}
        for rate in rates:
            if rate == 0:
                continue
            dpo = np.asarray(_rewards(arm(records, "dpo", rate)))
            ours = np.asarray(_rewards(arm(records, method, rate)))
            oracle = np.asarray(_rewards(arm(records, "oracle", rate)))
            if len(oracle) == len(dpo) == len(ours) and len(dpo):
                out[method][str(rate)] = ratio_interval(ours - dpo, oracle - dpo)
    return out


def _per_seed(values: Sequence[Optional[float]]) -> Optional[dict]:
    """:func:`mean_interval` of the values that exist, with the per-seed values; None if none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {**mean_interval(present), "per_seed": [None if v is None else float(v) for v in values]}


def _auroc_or_none(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    positive = np.asarray(positive, dtype=bool)
    return auroc(scores, positive) if positive.any() and (~positive).any() else None


def diagnostics(records: Sequence[dict], rates: Sequence[int]) -> Dict[str, dict]:
    """What explains the result, per label-flip rate > 0 and method, each per seed (every step
    up to the budget; u's factors after the metric's warm-up) then mean and 95 % interval over
    seeds: the AUROC for flipped pairs of the policy's own ``-l_theta`` and (Adaptive-DPO) of u,
    c and s; and the flipped pairs' share of the summed gradient scale ``|dL/dy|`` (``W
    sigmoid(-y)`` for the sigmoid head), against their share of the pairs seen (the oracle's is
    0: it never sees them)."""
    out: Dict[str, dict] = {}
    for rate in rates:
        if rate == 0:
            continue
        by_method: Dict[str, dict] = {}
        for method in METHODS:
            runs = [r for r in arm(records, method, rate) if r.get("l_theta") is not None]
            if not runs:
                continue
            row = {
                "auroc_minus_l_flipped": _per_seed([_auroc_or_none(-r["l_theta"], r["seen_flipped"]) for r in runs]),
                "flipped_share_of_pairs": _per_seed([float(np.mean(r["seen_flipped"])) for r in runs]),
            }
            if all(r.get("grad_scale") is not None for r in runs):
                row["grad_share_flipped"] = _per_seed([flipped_share(r["grad_scale"], r["seen_flipped"]) for r in runs])
            metric = _with_metric(runs)
            for name in ("u", "confidence", "stability"):
                if metric:
                    row[f"auroc_{name}_flipped"] = _per_seed([_auroc_or_none(r[name], r["flipped"]) for r in metric])
            by_method[method] = row
        out[str(rate)] = by_method
    return out


def paper_comparison(records: Sequence[dict], base: float, rates: Sequence[int]) -> dict:
    """The toy's figures in the units of the paper's (:mod:`fastpref.demo.paper`), per label-flip
    rate > 0: the share of clean DPO's gain that DPO keeps, and Adaptive-DPO's flip-specific
    advantage ``((A_r - D_r) - (A_0 - D_0)) / (D_0 - base)`` (A, D: Adaptive-DPO's and DPO's
    reward at rate r and 0 %), per seed (paired) with its mean and 95 % interval; next to the
    paper's range over its four metrics (Tab. 1-3, SD 1.5, Pick-a-Pic validation)."""
    out = {"paper": paper.flip_figures(), "toy": {}}
    dpo0 = np.asarray(_rewards(arm(records, "dpo", 0)))
    ada0 = np.asarray(_rewards(arm(records, "adaptive", 0)))
    if not len(dpo0) or len(ada0) != len(dpo0):
        return out
    clean_gain = float(dpo0.mean()) - base
    for rate in rates:
        if rate == 0 or clean_gain <= 0:
            continue
        dpo, ada = np.asarray(_rewards(arm(records, "dpo", rate))), np.asarray(_rewards(arm(records, "adaptive", rate)))
        if len(dpo) != len(dpo0) or len(ada) != len(dpo0):
            continue
        out["toy"][str(rate)] = {
            "dpo_keeps_share_of_clean_gain": mean_interval((dpo - base) / clean_gain),
            "adaptive_flip_specific_advantage": mean_interval(((ada - dpo) - (ada0 - dpo0)) / clean_gain),
            "adaptive_minus_dpo_at_0_share": mean_interval((ada0 - dpo0) / clean_gain),
        }
    return out


def metric_auroc(records: Sequence[dict], rates: Sequence[int]) -> dict:
    """AUROC of Adaptive-DPO's u for flipped vs kept pairs per flip rate: mean and std over seeds
    (``auroc_u_flipped``, ``auroc_u_flipped_std``) and its 95 % interval; each seed's AUROC
    pools its steps after the warm-up up to the budget."""
    out: dict = {"auroc_u_flipped": {}, "auroc_u_flipped_std": {}, "auroc_u_flipped_interval95": {}}
    for rate in rates:
        if rate == 0:
            continue
        values = [auroc(r["u"], r["flipped"]) for r in _with_metric(arm(records, "adaptive", rate))]
        summary = mean_interval(values) if values else {"mean": None, "std": None, "low": None, "high": None}
        key = str(rate)
        out["auroc_u_flipped"][key], out["auroc_u_flipped_std"][key] = summary["mean"], summary["std"]
        out["auroc_u_flipped_interval95"][key] = [summary["low"], summary["high"]]
    return out


def _mean(values: np.ndarray) -> Optional[float]:
    return float(values.mean()) if len(values) else None


def _quantiles(values: np.ndarray) -> Optional[List[float]]:
    return [float(q) for q in np.quantile(values, [0.1, 0.5, 0.9])] if len(values) else None


def metric_by_label(records: Sequence[dict], rates: Sequence[int]) -> Dict[str, dict]:
    """Adaptive-DPO's mean u, mean weight W and W's 10/50/90 % quantiles on kept and on flipped
    pairs per label-flip rate (all seeds, every step after the warm-up up to the budget)."""
    out = {}
    for rate in rates:
        runs = _with_metric(find(records, "flip", "adaptive", rate))
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


def u_bins(records: Sequence[dict], rates: Sequence[int]) -> dict:
    """The paper's Fig. 3: per label-flip rate, ``U_BINS`` equal-count bins of Adaptive-DPO's u (all
    seeds, every step after the warm-up up to the budget), their edges, pair counts and shares
    of flipped pairs."""
    bins: dict = {
        "binning": f"{U_BINS} bins of equal count (quantiles of u) per flip rate; "
        "Adaptive-DPO runs, all seeds, every step after the warm-up up to the budget"
    }
    for rate in rates:
        if rate == 0:
            continue
        runs = _with_metric(find(records, "flip", "adaptive", rate))
        if not runs:
            continue
        u, f = _pooled(runs, "u"), _pooled(runs, "flipped")
        edges = np.unique(np.quantile(u, np.linspace(0.0, 1.0, U_BINS + 1)))
        if len(edges) < 2:
            edges = np.array([u.min(), u.max() + 1e-12])
        counts, ratios = flipped_ratio_per_bin(u, f, edges)
        bins[str(rate)] = {"edges": [float(e) for e in edges], "count": counts, "flipped_ratio": ratios}
    return bins


def _arm_summary(runs: Sequence[dict], baseline: Sequence[dict]) -> dict:
    """Reward (mean and 95 % interval), AUROC of u for flipped pairs (the same), mean W on kept
    and flipped pairs, and the paired reward difference against ``baseline`` (same seeds)."""
    runs = list(runs)
    with_metric = _with_metric(runs)
    out = {"reward": mean_interval(_rewards(runs))}
    if with_metric:
        out["auroc_u_flipped"] = mean_interval([auroc(r["u"], r["flipped"]) for r in with_metric])
        w, f = _pooled(with_metric, "weight"), _pooled(with_metric, "flipped").astype(bool)
        out["weight_kept"], out["weight_flipped"] = _mean(w[~f]), _mean(w[f])
    out["paired_vs_defaults"] = paired_difference(_rewards(runs), _rewards(baseline))
    return out


def ablation(records: Sequence[dict]) -> dict:
    """The ablations of u (Adaptive-DPO at :data:`ABLATION_RATE`, the headline budget): per arm
    (the defaults, then :data:`ABLATIONS`), :func:`_arm_summary` against the defaults, all over
    the ablation's seeds (the headline runs of the other seeds are left out). Never used for the
    headline."""
    seeds = sorted({r["seed"] for r in records if r["study"] == "ablation"})
    default = [r for r in find(records, "flip", "adaptive", ABLATION_RATE) if r["seed"] in seeds]
    arms = {ABLATION_DEFAULT: _arm_summary(default, default)}
    for name in ABLATIONS:
        runs = find(records, "ablation", "adaptive", ABLATION_RATE, name)
        if runs:
            arms[name] = _arm_summary(runs, default)
    dpo = [r for r in find(records, "flip", "dpo", ABLATION_RATE) if r["seed"] in seeds]
    return {
        "rate": ABLATION_RATE,
        "seeds": seeds,
        "note": "ablation only: never used for the headline table or the budget",
        "dpo_reward": mean_interval(_rewards(dpo)),
        "arms": arms,
    }


def dedpo(records: Sequence[dict], world: tw.World, study: StudyConfig) -> dict:
    """The DeDPO comparison: the judge's accuracy (seed 0's noise); DPO on the judge's labels
    and on all-human labels (the clean DPO runs of the label-flip study: same seed, pairs, order,
    steps); per propensity, DPO on the human-labelled pairs only and DeDPO, with DeDPO's paired
    differences against both partial baselines and the spread of its debiased labels across seeds."""
    judge, biased = labels.synthetic_judge(world.pairs, world.config, biased_colours=study.judge_biased_colours, seed=0)
    right = judge > 0.5
    synthetic = find(records, "dedpo", "synthetic")
    out = {
        "propensities": list(study.propensities),
        "judge": {
            "biased_colours": list(study.judge_biased_colours),
            "strength": 2.0,
            "noise": 1.0,
            "accuracy_seed0": float(right.float().mean()),
            "accuracy_on_biased_prompts_seed0": float(right[biased].float().mean()) if biased.any() else None,
            "accuracy_elsewhere_seed0": float(right[~biased].float().mean()) if (~biased).any() else None,
        },
        "synthetic": mean_interval(_rewards(synthetic)),
        "all-human": mean_interval(_rewards(find(records, "flip", "dpo", 0))),
        "note": "all-human is the clean DPO run of the flip study (same seed, pairs, order and steps)",
        "by_propensity": {},
    }
    for propensity in study.propensities:
        key = f"{propensity:g}"
        human = find(records, "dedpo", "human-only", 0, key)
        ours = find(records, "dedpo", "dedpo", 0, key)
        if not human or not ours:
            continue
        estimator = [r["label_estimator"] for r in ours]
        out["by_propensity"][key] = {
            "human-only": mean_interval(_rewards(human)),
            "dedpo": mean_interval(_rewards(ours)),
            "dedpo_minus_human_only": paired_difference(_rewards(ours), _rewards(human)),
            "dedpo_minus_synthetic": paired_difference(_rewards(ours), _rewards(synthetic)),
            "label_estimator": {name: mean_interval([e[name] for e in estimator]) for name in sorted(estimator[0])},
        }
    return out
