"""The study's tables (``results.md``) from a results dictionary (``results.json``): the headline
budget, the label-flip table (paper Tab. 2 layout, with 95 % intervals), the paired differences
with one conclusion per label-flip rate, Adaptive-DPO's metric, the ablations of u and the DeDPO
comparison."""

from __future__ import annotations

from typing import List, Optional

from .config import DEDPO_NAMES, METHOD_NAMES, METHODS


def markdown(results: dict) -> str:
    """Every table of ``results.md``, each with its caption."""
    parts = (
        budget_lines,
        flip_table,
        paired_table,
        metric_table,
        ablation_table,
        dedpo_table,
    )
    lines: List[str] = []
    for part in parts:
        lines += part(results)
    return "\n".join(lines) + "\n"


def _fmt(mean: Optional[float], std: Optional[float] = None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _ci(summary: Optional[dict], digits: int = 3, sign: bool = False) -> str:
    """``mean [low, high]`` of a :func:`fastpref.stats.mean_interval` summary."""
    if summary is None or summary.get("mean") is None:
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if summary.get("low") is None:
        return f.format(summary["mean"])
    return f"{f.format(summary['mean'])} [{f.format(summary['low'])}, {f.format(summary['high'])}]"


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def conclusion(name: str, difference: dict) -> str:
    """One sentence: whether the 95 % interval of a paired difference excludes zero."""
    if difference["excludes_zero"] is None:
        return f"{name}: {_ci(difference, sign=True)} (one seed: no interval)."
    verdict = (
        ("excludes zero: better" if difference["low"] > 0 else "excludes zero: worse")
        if difference["excludes_zero"]
        else "includes zero: no detectable difference"
    )
    return f"{name}: {_ci(difference, sign=True)}, the 95 % interval {verdict}."


def budget_lines(results: dict) -> List[str]:
    """How the headline budget was chosen (``--full``), or the budget used."""
    budget = results.get("budget")
    if budget is None:
        return [
            f"Budget: {results['steps']} optimizer steps per run (chosen by `fastpref demo --full`; docs/demo.md).",
            "",
        ]
    curve = budget["curve"]
    peak = curve["step"].index(budget["steps"])
    return [
        f"Budget: **{budget['steps']} steps**, {budget['rule']}; there DPO's curve reward is "
        f"{_ci({k: curve[k][peak] for k in ('mean', 'low', 'high')})} (base {curve['mean'][0]:.3f}, "
        f"last step {curve['step'][-1]}: {curve['mean'][-1]:.3f}).",
        "",
    ]


def flip_table(results: dict) -> List[str]:
    """Method, label-flip rate, reward (mean and 95 % interval), std, gain over the base model, the
    share of clean DPO's gain kept, and the AUROC of u for flipped vs kept pairs (Adaptive-DPO)."""
    base = results["base_reward"]
    lines = [
        "Toy-world label-flip study: mean reward of DDIM samples on held-out prompts after "
        f"{results['steps']} steps (mean [95 % interval] and std over {results['seeds']} seed(s)); "
        f"base model {base:.3f}.",
        "",
        _row(
            "Method",
            "Label-flip rate (%)",
            "Reward (↑) [95 % CI]",
            "Std",
            "Gain over base",
            "Share of clean DPO's gain",
            "AUROC of u, flipped vs kept",
        ),
        "|---|---|---|---|---|---|---|",
        _row("Base model", "–", f"{base:.3f}", "–", "–", "–", "–"),
    ]
    for method in METHODS:
        for i, rate in enumerate(results["flip_rates"]):
            key = str(rate)
            low, high = results["reward_interval95"][method][key]
            au = "–"
            if method == "adaptive" and rate > 0:
                au = _fmt(results["auroc_u_flipped"][key], results["auroc_u_flipped_std"][key], 2)
            lines.append(
                _row(
                    METHOD_NAMES[method] if i == 0 else "",
                    key,
                    _ci({"mean": results["reward"][method][key], "low": low, "high": high}),
                    f"{results['reward_std'][method][key]:.3f}",
                    f"{results['gain'][method][key]:+.3f}",
                    _pct(results["retained_share_of_clean_dpo_gain"][method][key]),
                    au,
                )
            )
    return lines


def paired_table(results: dict) -> List[str]:
    """The per-seed differences against DPO at each label-flip rate and one conclusion per rate."""
    paired = results["paired_vs_dpo"]
    methods = list(paired)
    lines = [
        "",
        "Paired differences in reward against DPO (same seed: same pairs, order, flips and noise); "
        "mean over seeds [95 % t-interval]:",
        "",
        _row("Flip rate (%)", *(f"{METHOD_NAMES[m]} − DPO" for m in methods)),
        "|---|" + "---|" * len(methods),
    ]
    for rate in results["flip_rates"]:
        lines.append(_row(str(rate), *(_ci(paired[m][str(rate)], sign=True) for m in methods)))
    lines.append("")
    for rate in results["flip_rates"]:
        sentences = [conclusion(f"{METHOD_NAMES[m]} − DPO", paired[m][str(rate)]) for m in methods]
        lines.append(f"- {rate} % flips: " + " ".join(sentences))
    return lines


def metric_table(results: dict) -> List[str]:
    """Adaptive-DPO's mean u and weight W on kept and flipped pairs per flip rate."""
    metric = results.get("adaptive_metric", {})
    if not metric:
        return []
    lines = [
        "",
        "Adaptive-DPO's metric u and weight W on flipped and kept pairs (all steps after the warm-up "
        "up to the budget, all seeds):",
        "",
        "| Flip rate (%) | u kept | u flipped | W kept | W flipped |",
        "|---|---|---|---|---|",
    ]
    for rate, m in metric.items():
        lines.append(
            _row(
                rate,
                _fmt(m["u_kept"], None, 4),
                _fmt(m["u_flipped"], None, 4),
                _fmt(m["weight_kept"]),
                _fmt(m["weight_flipped"]),
            )
        )
    return lines


def ablation_table(results: dict) -> List[str]:
    """The ablations of u (``--full``), marked as such."""
    a = results.get("ablation")
    if not a:
        return []
    lines = [
        "",
        f"**Ablation (not used for the headline or the budget)**: Adaptive-DPO at {a['rate']} % flips, "
        f"{results['steps']} steps; DPO there {_ci(a['dpo_reward'])}. Mean [95 % interval] over seeds.",
        "",
        "| Variant | Reward (↑) | − defaults, paired | AUROC of u, flipped | W kept | W flipped |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in a["arms"].items():
        lines.append(
            _row(
                name,
                _ci(arm["reward"]),
                _ci(arm["paired_vs_defaults"], sign=True),
                _ci(arm.get("auroc_u_flipped"), 2),
                _fmt(arm.get("weight_kept")),
                _fmt(arm.get("weight_flipped")),
            )
        )
    return lines


def dedpo_table(results: dict) -> List[str]:
    """The judge, and per propensity DeDPO against DPO on the human-labelled pairs and on the
    judge's labels (paired), with the spread of the debiased labels across seeds."""
    d = results.get("dedpo")
    if not d:
        return []
    judge = d["judge"]
    lines = [
        "",
        f"DeDPO: a judge right on {_pct(judge['accuracy_elsewhere_seed0'])} of pairs but systematically wrong on "
        f"{', '.join(judge['biased_colours'])} prompts (right on {_pct(judge['accuracy_on_biased_prompts_seed0'])}), "
        f"{_pct(judge['accuracy_seed0'])} overall; humans label a share p (the propensity) of the pairs. "
        f"{DEDPO_NAMES['synthetic']}: {_ci(d['synthetic'])}; {DEDPO_NAMES['all-human']}: {_ci(d['all-human'])}.",
        "",
        "| Propensity p | DPO, human pairs only | DeDPO | DeDPO − human-only, paired | DeDPO − judge-only, paired "
        "| Debiased labels: mean error | RMS error |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, row in d["by_propensity"].items():
        est = row["label_estimator"]
        lines.append(
            _row(
                p,
                _ci(row["human-only"]),
                _ci(row["dedpo"]),
                _ci(row["dedpo_minus_human_only"], sign=True),
                _ci(row["dedpo_minus_synthetic"], sign=True),
                _ci(est["debiased_mean_error"], sign=True),
                _ci(est["debiased_rms_error"], 2),
            )
        )
    return lines
