"""The demo's charts, drawn with matplotlib from a results dictionary (``results.json``): held-out
reward vs label-flip rate, the share of flipped pairs per bin of u (the paper's Fig. 3), the
structured minority and the DeDPO comparison. ``python -m fastpref.demo.plots results.json [DIR]``
redraws them from a finished run.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .config import DEDPO_NAMES, METHOD_NAMES, MIN_BIN_COUNT

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
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
        "flipped_ratio_vs_u.png": flipped_ratio_vs_u,
        "structured.png": structured,
        "dedpo.png": dedpo,
    }
    names = []
    for name, draw in charts.items():
        if _save(draw, results, Path(output_dir) / name):
            names.append(name)
    return names


def _save(draw: Callable, results: dict, file: Path) -> bool:
    """Run ``draw(results, axes)`` on a new figure and save it as ``file`` if it drew anything.
    The figure is not registered with pyplot and the style is set only inside this call, so
    neither the user's backend nor their rcParams change."""
    import matplotlib
    import matplotlib.style
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(7.5, 4.4), layout="constrained")
        if not draw(results, figure.subplots()):
            return False
        figure.savefig(file, format="png", metadata={"Software": None})  # no version stamp: same bytes
    return True


def _seeds(results: dict) -> str:
    seeds = results["seeds"]
    return f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"


def _dodge(count: int, width: float) -> List[float]:
    """Offsets that spread ``count`` series over ``width`` around each x, so error bars do not overlap."""
    if count < 2:
        return [0.0]
    return [width * (i / (count - 1) - 0.5) for i in range(count)]


def _base_line(axes, value: Optional[float], label: str, colour: str = "grey"):
    """A dashed horizontal line at the base model's reward (none when ``value`` is None)."""
    if value is None:
        return None
    return axes.axhline(value, color=colour, linestyle="--", linewidth=1, label=label)


def reward_vs_flip(results: dict, axes) -> bool:
    """Held-out reward (mean ± std over seeds) of every method at each flip rate, with the base model."""
    rates = list(results["flip_rates"])
    methods = list(results["reward"])
    for method, colour, offset in zip(methods, COLOURS, _dodge(len(methods), 1.6)):
        mean = [results["reward"][method][str(rate)] for rate in rates]
        std = [results["reward_std"][method][str(rate)] for rate in rates]
        axes.errorbar(
            [rate + offset for rate in rates],
            mean,
            yerr=std,
            color=colour,
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.5,
            label=METHOD_NAMES.get(method, method),
        )
    _base_line(axes, results["base_reward"], f"base model ({results['base_reward']:.3f})")
    axes.set_xticks(rates, [f"{rate} %" for rate in rates])
    axes.set_xlabel("share of training labels flipped")
    axes.set_ylabel("held-out reward (↑)")
    axes.set_title(f"Held-out reward vs label-flip rate ({_seeds(results)})")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return True


def flipped_ratio_vs_u(results: dict, axes) -> bool:
    """The paper's Fig. 3: the share of flipped pairs in each equal-count bin of Adaptive-DPO's u,
    low to high, one line per flip rate; a dotted line marks the flip rate (no signal in u).
    Bins with fewer than ``MIN_BIN_COUNT`` pairs are left out."""
    bins = {rate: b for rate, b in results["u_bins"].items() if isinstance(b, dict)}
    if not bins:
        return False
    count = 0
    for (rate, b), colour in zip(bins.items(), COLOURS):
        points = [
            (i + 1, 100 * ratio)
            for i, (ratio, n) in enumerate(zip(b["flipped_ratio"], b["count"]))
            if ratio is not None and n >= MIN_BIN_COUNT
        ]
        if points:
            axes.plot(*zip(*points), color=colour, marker="o", markersize=4, label=f"{rate} % of labels flipped")
        axes.axhline(float(rate), color=colour, linestyle=":", linewidth=1)
        count = max(count, len(b["count"]))
    axes.set_xticks(range(1, count + 1))
    axes.set_xlabel("bin of u, lowest to highest (equal-count bins; edges in results.json)")
    axes.set_ylabel("flipped pairs in the bin (%)")
    axes.set_title("Share of flipped pairs per bin of Adaptive-DPO's u (paper Fig. 3)")
    axes.legend(title="dotted: the flip rate (u without signal)", loc="upper left")
    return True


def _points(
    axes,
    names: Sequence[str],
    series: Dict[str, tuple],
    *,
    width: float = 0.3,
) -> None:
    """Markers with error bars at categorical positions, one dodged series per entry
    ``label -> (means, stds, colour)``, each point labelled with its mean."""
    for (label, (means, stds, colour)), offset in zip(series.items(), _dodge(len(series), width)):
        xs = [i + offset for i in range(len(names))]
        axes.errorbar(xs, means, yerr=stds, color=colour, fmt="o", markersize=6, capsize=4, label=label)
        for x, mean in zip(xs, means):
            axes.annotate(f"{mean:.3f}", (x, mean), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    axes.set_xticks(range(len(names)), [textwrap.fill(name, 20) for name in names])
    axes.set_xlim(-0.6, len(names) - 0.4)


def structured(results: dict, axes) -> bool:
    """The structured minority: reward of each method on the held-out prompts (all colours) and
    on every prompt of the minority's colour, with the base model's on both."""
    s = results["structured"]
    methods = list(s["reward"])
    if not methods:
        return False
    colour = s["minority_colour"]
    held_out, minority = COLOURS[0], COLOURS[1]
    series = {
        "held-out prompts, all colours": (
            [s["reward"][m] for m in methods],
            [s["reward_std"][m] for m in methods],
            held_out,
        ),
        f"every {colour} prompt": (
            [s["reward_minority_colour_all_prompts"][m] for m in methods],
            [s["reward_minority_colour_all_prompts_std"][m] for m in methods],
            minority,
        ),
    }
    _points(axes, [METHOD_NAMES.get(m, m) for m in methods], series)
    base_all = s.get("base_reward_minority_colour_all_prompts")
    _base_line(axes, results["base_reward"], f"base model, held-out ({results['base_reward']:.3f})", held_out)
    _base_line(axes, base_all, f"base model, {colour} ({base_all or 0:.3f})", minority)
    axes.set_ylabel("reward (↑)")
    axes.set_title(
        f"Structured minority: every {colour} pair labelled by annotators who prefer\n"
        f"the brighter image ({_seeds(results)})"
    )
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    return True


def dedpo(results: dict, axes) -> bool:
    """DeDPO against DPO on each source of labels: held-out reward (mean ± std over seeds)."""
    d = results["dedpo"]
    arms = list(d["reward"])
    if not arms:
        return False
    series = {"": ([d["reward"][a] for a in arms], [d["reward_std"][a] for a in arms], COLOURS[0])}
    _points(axes, [DEDPO_NAMES.get(a, a) for a in arms], series)
    base = _base_line(axes, results["base_reward"], f"base model ({results['base_reward']:.3f})")
    axes.set_ylabel("held-out reward (↑)")
    human = d.get("human_fraction")
    share = f"humans label {100 * human:.0f} % of pairs, " if human is not None else ""
    axes.set_title(f"DeDPO: held-out reward by the labels trained on\n({share}{_seeds(results)})")
    axes.legend(handles=[base], loc="lower left", bbox_to_anchor=(0.0, 0.04))
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
