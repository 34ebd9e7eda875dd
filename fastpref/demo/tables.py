"""The study's tables (``results.md``) from a results dictionary (``results.json``): the label-flip
table in the paper's Tab. 2 layout, Adaptive-DPO's metric on flipped and kept pairs, the
structured minority and the DeDPO comparison."""

from __future__ import annotations

from typing import List, Optional

from .config import DEDPO_ARMS, DEDPO_NAMES, FLIP_RATES, METHOD_NAMES, METHODS, STRUCTURED_METHODS


def markdown(results: dict) -> str:
    """Every table of ``results.md``, each with its caption."""
    lines = flip_table(results) + metric_table(results) + structured_table(results) + dedpo_table(results)
    return "\n".join(lines) + "\n"


def _fmt(mean: Optional[float], std: Optional[float] = None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def flip_table(results: dict) -> List[str]:
    """Method, flip rate, reward (mean ± std), gain over the base model, the share of clean
    DPO's gain kept, and the AUROC of u for flipped vs kept pairs (adaptive methods)."""
    base = results["base_reward"]
    lines = [
        "Toy-world label-flip study: mean reward of DDIM samples on held-out prompts "
        f"(mean ± std over {results['seeds']} seed(s)); base model {base:.3f}.",
        "",
        _row(
            "Method",
            "Label-flip rate (%)",
            "Reward (↑)",
            "Gain over base",
            "Share of clean DPO's gain",
            "AUROC of u, flipped vs kept",
        ),
        "|---|---|---|---|---|---|",
        _row("Base model", "–", f"{base:.3f}", "–", "–", "–"),
    ]
    for method in METHODS:
        for i, rate in enumerate(FLIP_RATES):
            key = str(rate)
            au = "–"
            if method in ("adaptive", "adaptive-ipo") and rate > 0:
                name = "auroc_u_flipped" if method == "adaptive" else "auroc_u_flipped_adaptive_ipo"
                au = _fmt(results[name][key], results[name + "_std"][key], 2)
            lines.append(
                _row(
                    METHOD_NAMES[method] if i == 0 else "",
                    str(rate),
                    _fmt(results["reward"][method][key], results["reward_std"][method][key]),
                    f"{results['gain'][method][key]:+.3f}",
                    _pct(results["retained_share_of_clean_dpo_gain"][method][key]),
                    au,
                )
            )
    return lines


def metric_table(results: dict) -> List[str]:
    """Adaptive-DPO's mean u and weight W on kept and flipped pairs per flip rate (none when
    no run logged the metric)."""
    metric = results.get("adaptive_metric", {})
    if not metric:
        return []
    lines = [
        "",
        "Adaptive-DPO's metric u and weight W on flipped and kept pairs (all steps after the warm-up, all seeds):",
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


def structured_table(results: dict) -> List[str]:
    """The structured minority's labels and each method's reward on all held-out prompts, on
    the minority colour's and the other colours' held-out prompts, and on every minority prompt."""
    s = results["structured"]
    colour = s["minority_colour"]
    lines = [
        "",
        f"Structured minority: every pair of colour **{colour}** ({_pct(s['minority_share_of_pairs'])} of the "
        f"pairs) is labelled by annotators who prefer the brighter image; "
        f"{_pct(s['minority_labels_against_reward'])} of those labels disagree with the reward. "
        f"AUROC of Adaptive-DPO's u for labels against the reward: {_fmt(s['auroc_u_against_reward'], None, 2)}; "
        f"for minority membership: {_fmt(s.get('auroc_u_minority_member'), None, 2)}.",
        "",
        _row(
            "Method",
            "Reward, held-out (↑)",
            f"Held-out {colour} prompts",
            "Held-out other colours",
            f"All {colour} prompts",
        ),
        "|---|---|---|---|---|",
        _row(
            "Base model",
            f"{results['base_reward']:.3f}",
            _fmt(s["base_reward_minority_colour"]),
            "–",
            _fmt(s.get("base_reward_minority_colour_all_prompts")),
        ),
    ]
    for method in STRUCTURED_METHODS:
        if method in s["reward"]:
            lines.append(
                _row(
                    METHOD_NAMES[method],
                    *(
                        _fmt(s[key][method], s[key + "_std"][method])
                        for key in (
                            "reward",
                            "reward_minority_colour",
                            "reward_other_colours",
                            "reward_minority_colour_all_prompts",
                        )
                    ),
                )
            )
    return lines


def dedpo_table(results: dict) -> List[str]:
    """The judge, the human share, and each DeDPO arm's reward and gain over the base model."""
    d = results["dedpo"]
    judge = d["judge"]
    lines = [
        "",
        f"DeDPO: a judge that is right on {_pct(judge['accuracy_elsewhere_seed0'])} of pairs but systematically "
        f"wrong on {', '.join(judge['biased_colours'])} prompts (right on "
        f"{_pct(judge['accuracy_on_biased_prompts_seed0'])}), {_pct(judge['accuracy_seed0'])} overall; human "
        f"labels on {_pct(d['human_fraction'])} of the pairs (propensity {d['human_fraction']:g}).",
        "",
        "| Labels | Reward (↑) | Gain over base |",
        "|---|---|---|",
    ]
    for arm in DEDPO_ARMS:
        if arm in d["reward"]:
            lines.append(
                _row(
                    DEDPO_NAMES[arm],
                    _fmt(d["reward"][arm], d["reward_std"][arm]),
                    f"{d['reward'][arm] - results['base_reward']:+.3f}",
                )
            )
    return lines
