"""The demo's charts, drawn with matplotlib from a results dictionary (``results.json``): held-out
reward vs label-flip rate, the paired differences against DPO, the share of flipped pairs per bin
of u (the paper's Fig. 3), and with ``--full`` the learning curves, u's diagnostics against the
step and the DeDPO comparison. ``python -m fastpref.demo.plots results.json [DIR]``
redraws them from a finished run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .config import DEDPO_NAMES, METHOD_NAMES, MIN_BIN_COUNT

# figure sizes in inches; the rest: (7.5, 4.4)
SIZES = {"curves.png": (10.0, 4.2), "diagnostics.png": (10.0, 7.5), "reward_vs_flip.png": (10.0, 4.4)}

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#e5e5e5",
    "legend.frameon": False,
    "savefig.dpi": 150,
}


def available() -> bool:
    """Whether matplotlib (the ``demo`` extra) can be imported."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plots(results: dict, output_dir) -> List[str]:
    """Draw every chart the results hold data for into ``output_dir``; returns the file names."""
    charts: Dict[str, Callable] = {
        "reward_vs_flip.png": reward_vs_flip,
        "paired.png": paired,
        "flipped_ratio_vs_u.png": flipped_ratio_vs_u,
        "curves.png": curves,
        "diagnostics.png": diagnostics,
        "dedpo.png": dedpo,
    }
    names = []
    for name, draw in charts.items():
        if _save(draw, results, Path(output_dir) / name, SIZES.get(name, (7.5, 4.4))):
            names.append(name)
    return names


def _save(draw: Callable, results: dict, file: Path, size) -> bool:
    """Run ``draw(results, figure)`` on a new figure of ``size`` inches and save it as ``file``
    if it drew anything.
    The figure is not registered with pyplot and the style is set only inside this call, so
    neither the user's backend nor their rcParams change."""
    import matplotlib
    import matplotlib.style
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        figure = Figure(figsize=size, layout="constrained")
        if not draw(results, figure):
            return False
        figure.savefig(file, format="png", metadata={"Software": None})  # no version stamp: same bytes
    return True


def _dodge(count: int, width: float) -> List[float]:
    """Offsets that spread ``count`` series over ``width`` around each x, so error bars do not overlap."""
    if count < 2:
        return [0.0]
    return [width * (i / (count - 1) - 0.5) for i in range(count)]


def _base_line(axes, value: Optional[float], label: str, color: str = "grey"):
    """A dashed horizontal line at the base model's reward (none when ``value`` is None)."""
    if value is None:
        return None
    return axes.axhline(value, color=color, linestyle="--", linewidth=1, label=label)


def _yerr(means: Sequence[float], intervals: Sequence) -> list:
    """Matplotlib's asymmetric error bars from ``[low, high]`` intervals (zero where absent)."""
    low = [m - i[0] if i[0] is not None else 0.0 for m, i in zip(means, intervals)]
    high = [i[1] - m if i[1] is not None else 0.0 for m, i in zip(means, intervals)]
    return [low, high]


def reward_vs_flip(results: dict, figure) -> bool:
    """Held-out reward (mean and 95 % interval over seeds) of every method at each label-flip
    rate, with the base model; the oracle (an upper bound) dashed."""
    axes = figure.subplots()
    rates = list(results["flip_rates"])
    methods = list(results["reward"])
    for method, color, offset in zip(methods, COLORS, _dodge(len(methods), 1.6)):
        mean = [results["reward"][method][str(rate)] for rate in rates]
        intervals = [results["reward_interval95"][method][str(rate)] for rate in rates]
        axes.errorbar(
            [rate + offset for rate in rates],
            mean,
            yerr=_yerr(mean, intervals),
            color=color,
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.5,
            linestyle="--" if method == "oracle" else "-",  # an upper bound, not a method
            label=METHOD_NAMES.get(method, method),
        )
    _base_line(axes, results["base_reward"], f"base model ({results['base_reward']:.3f})")
    axes.set_xticks(rates, [f"{rate} %" for rate in rates])
    axes.set_xlabel("share of training labels flipped")
    axes.set_ylabel("held-out reward (↑)")
    axes.set_title(
        f"Held-out reward vs flip rate, {results['steps']} steps (mean, 95 % interval, {results['seeds']} seeds)"
    )
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return True


def paired(results: dict, figure) -> bool:
    """Per-seed differences against DPO (mean and 95 % interval) at each label-flip rate, and each seed's."""
    axes = figure.subplots()
    rates = list(results["flip_rates"])
    diffs = results["paired_vs_dpo"]
    for (method, by_rate), color, offset in zip(diffs.items(), COLORS[1:], _dodge(len(diffs), 2.0)):
        xs = [rate + offset for rate in rates]
        mean = [by_rate[str(rate)]["mean"] for rate in rates]
        intervals = [(by_rate[str(r)]["low"], by_rate[str(r)]["high"]) for r in rates]
        axes.errorbar(
            xs,
            mean,
            yerr=_yerr(mean, intervals),
            color=color,
            fmt="D" if method == "oracle" else "o",  # an upper bound, not a method
            markerfacecolor="white" if method == "oracle" else color,
            capsize=4,
            label=f"{METHOD_NAMES[method]} − DPO",
        )
        for x, rate in zip(xs, rates):
            seeds = by_rate[str(rate)]["differences"]
            axes.scatter([x + 0.35] * len(seeds), seeds, color=color, s=8, alpha=0.5)
    axes.axhline(0.0, color="grey", linewidth=1)
    axes.set_xticks(rates, [f"{rate} %" for rate in rates])
    axes.set_xlabel("share of training labels flipped")
    axes.set_ylabel("reward difference vs DPO, same seed")
    axes.set_title(f"Paired differences against DPO: mean, 95 % interval, seeds (dots); {results['steps']} steps")
    axes.legend(loc="upper left", fontsize=8)
    return True


def _band(axes, curve: dict, color: str, label: str, scale: float = 1.0) -> bool:
    """A mean line with its 95 % interval as a band; False when the curve holds no value."""
    points = [
        (s, m, lo, hi)
        for s, m, lo, hi in zip(curve["step"], curve["mean"], curve["low"], curve["high"])
        if m is not None
    ]
    if not points:
        return False
    steps, mean, low, high = zip(*points)
    axes.plot(steps, [scale * m for m in mean], color=color, linewidth=1.5, marker="o", markersize=2.5, label=label)
    if all(v is not None for v in low + high):
        axes.fill_between(
            steps, [scale * v for v in low], [scale * v for v in high], color=color, alpha=0.18, linewidth=0
        )
    return True


def curves(results: dict, figure) -> bool:
    """Held-out reward (curve evaluation) against the optimizer step, one panel per curve
    label-flip rate, every method's mean and 95 % band, the base model and the chosen budget."""
    data = results.get("curves")
    if not data:
        return False
    rates = sorted({rate for by_rate in data.values() for rate in by_rate}, key=int)
    panels = figure.subplots(1, len(rates), sharey=True, squeeze=False)[0]
    budget = results["steps"]
    for axes, rate in zip(panels, rates):
        for (method, by_rate), color in zip(data.items(), COLORS):
            if rate in by_rate:
                _band(axes, by_rate[rate]["reward"], color, METHOD_NAMES[method])
        axes.axvline(budget, color="black", linestyle=":", linewidth=1, label=f"budget ({budget} steps)")
        axes.set_title(f"{rate} % of labels flipped")
        axes.set_xlabel("optimizer step")
        axes.legend(loc="lower right")
    panels[0].set_ylabel("held-out reward, curve evaluation (↑)")
    figure.suptitle(f"Learning curves: mean and 95 % interval over {results['seeds']} seeds (step 0: base model)")
    return True


def diagnostics(results: dict, figure) -> bool:
    """u's diagnostics against the step at the curves' non-zero flip rate: AUROC for flipped
    pairs of Adaptive-DPO's u, c, s and of -l_theta (DPO's, Adaptive-DPO's); W on flipped and kept
    pairs and the flipped pairs' share of the gradient scale (DPO, Adaptive-DPO); implicit
    accuracy on flipped and kept pairs (DPO, Adaptive-DPO); RMS of l_theta."""
    data = results.get("curves", {})
    adaptive = {r: c for r, c in data.get("adaptive", {}).items() if r != "0"}
    if not adaptive:
        return False
    rate = sorted(adaptive, key=int)[-1]
    a, d = adaptive[rate], data.get("dpo", {}).get(rate)
    (auc, weight), (acc, scale) = figure.subplots(2, 2)
    _band(auc, a["auroc_u_flipped"], COLORS[1], "u (Adaptive-DPO)")
    _band(auc, a["auroc_confidence_flipped"], COLORS[4], "c, u's confidence")
    _band(auc, a["auroc_stability_flipped"], COLORS[5], "s, u's stability")
    _band(auc, a["auroc_minus_l_flipped"], COLORS[3], "−l_θ (Adaptive-DPO)")
    if d:
        _band(auc, d["auroc_minus_l_flipped"], COLORS[0], "−l_θ (DPO)")
    auc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    auc.set_title("AUROC for flipped vs kept pairs")
    auc.legend(loc="lower right", fontsize=8)
    _band(weight, a["weight_kept"], COLORS[2], "W, kept pairs")
    _band(weight, a["weight_flipped"], COLORS[1], "W, flipped pairs")
    _band(weight, a["grad_share_flipped"], COLORS[3], "flipped share of |dL/dy|, Adaptive-DPO")
    if d:
        _band(weight, d["grad_share_flipped"], COLORS[0], "flipped share of |dL/dy|, DPO")
    weight.set_title("Adaptive-DPO's W; flipped pairs' share of the push")
    weight.legend(loc="center right", fontsize=8)
    for runs, name, style in ((a, "Adaptive-DPO", "-"), (d, "DPO", "--")):
        if runs:
            for key, color, label in (
                ("implicit_acc_kept", COLORS[2], "kept"),
                ("implicit_acc_flipped", COLORS[1], "flipped"),
            ):
                if _band(acc, runs[key], color, f"{name}, {label}"):
                    acc.lines[-1].set_linestyle(style)
    acc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    acc.set_title("Implicit accuracy (l_θ > 0) on the presented labels")
    acc.legend(loc="best", fontsize=8)
    _band(scale, a["l_rms"], COLORS[1], "Adaptive-DPO")
    if d:
        _band(scale, d["l_rms"], COLORS[0], "DPO")
    scale.set_yscale("log")
    scale.set_title("RMS of l_θ over the pairs (the scale u divides out)")
    scale.legend(loc="lower right")
    for axes in (auc, weight, acc, scale):
        axes.axvline(results["steps"], color="black", linestyle=":", linewidth=1)
        axes.set_xlabel("optimizer step (window of steps ending here)")
    figure.suptitle(f"u's diagnostics at {rate} % flips: mean and 95 % interval over {results['seeds']} seeds")
    return True


def flipped_ratio_vs_u(results: dict, figure) -> bool:
    """The paper's Fig. 3: the share of flipped pairs in each equal-count bin of Adaptive-DPO's u,
    low to high, one line per label-flip rate; a dotted line marks the label-flip rate (no signal in u).
    Bins with fewer than ``MIN_BIN_COUNT`` pairs are left out."""
    bins = {rate: b for rate, b in results["u_bins"].items() if isinstance(b, dict)}
    if not bins:
        return False
    axes = figure.subplots()
    count = 0
    for (rate, b), color in zip(bins.items(), COLORS):
        points = [
            (i + 1, 100 * ratio)
            for i, (ratio, n) in enumerate(zip(b["flipped_ratio"], b["count"]))
            if ratio is not None and n >= MIN_BIN_COUNT
        ]
        if points:
            axes.plot(*zip(*points), color=color, marker="o", markersize=4, label=f"{rate} % of labels flipped")
        axes.axhline(float(rate), color=color, linestyle=":", linewidth=1, label=f"{rate} %: u without signal")
        count = max(count, len(b["count"]))
    axes.set_xticks(range(1, count + 1))
    axes.set_xlabel("bin of u, lowest to highest (equal-count bins; edges in results.json)")
    axes.set_ylabel("flipped pairs in the bin (%)")
    axes.set_title("Share of flipped pairs per bin of Adaptive-DPO's u (paper Fig. 3)")
    axes.legend(loc="upper left")
    return True


def dedpo(results: dict, figure) -> bool:
    """DeDPO against DPO on the human-labelled pairs only at each propensity (mean and 95 %
    interval over seeds), with DPO on the judge's labels and on all-human labels as lines."""
    d = results.get("dedpo")
    if not d or not d["by_propensity"]:
        return False
    axes = figure.subplots()
    props = list(d["by_propensity"])
    xs = [float(p) for p in props]
    for arm, color, offset in zip(("human-only", "dedpo"), COLORS, _dodge(2, 0.03)):
        rows = [d["by_propensity"][p][arm] for p in props]
        mean = [r["mean"] for r in rows]
        axes.errorbar(
            [x + offset for x in xs],
            mean,
            yerr=_yerr(mean, [(r["low"], r["high"]) for r in rows]),
            color=color,
            marker="o",
            capsize=4,
            label=DEDPO_NAMES[arm],
        )
    for arm, color in (("synthetic", COLORS[3]), ("all-human", COLORS[2])):
        axes.axhline(
            d[arm]["mean"],
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"{DEDPO_NAMES[arm]} ({d[arm]['mean']:.3f})",
        )
    _base_line(axes, results["base_reward"], f"base model ({results['base_reward']:.3f})")
    axes.set_xticks(xs, [f"{x:g}" for x in xs])
    axes.set_xlabel("propensity: share of pairs with a human label")
    axes.set_ylabel("held-out reward (↑)")
    seeds = d["by_propensity"][props[0]]["dedpo"]["n"]
    axes.set_title(f"DeDPO by propensity\n({results['steps']} steps; mean and 95 % interval over {seeds} seeds)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpref.demo.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results.json written by fastpref demo")
    parser.add_argument("output_dir", nargs="?", default=None, help="where the PNGs go (default: beside the JSON)")
    args = parser.parse_args(argv)
    results_file = Path(args.results)
    output_dir = Path(args.output_dir) if args.output_dir else results_file.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    names = write_plots(json.loads(results_file.read_text()), output_dir)
    print(f"wrote {', '.join(str(output_dir / name) for name in names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
