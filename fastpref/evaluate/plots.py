"""A chart per metric (matplotlib, the ``demo`` extra): each model's mean with its 95 % interval,
and each tuned model's win rate against the base with its interval."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List

STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 120}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def error_bars(cells: List[dict], scale: float = 1.0) -> list:
    """Matplotlib's ``[below, above]`` error bars of interval cells (zero without an interval)."""
    below = [0.0 if c["low"] is None else scale * (c["mean"] - c["low"]) for c in cells]
    above = [0.0 if c["high"] is None else scale * (c["high"] - c["mean"]) for c in cells]
    return [below, above]


def draw(entry: dict, figure) -> None:
    names = list(entry["models"])
    means = [entry["models"][name]["mean"] for name in names]
    tuned = names[1:]
    left, right = figure.subplots(1, 2) if tuned else (figure.subplots(), None)
    left.errorbar(range(len(names)), [c["mean"] for c in means], yerr=error_bars(means), fmt="o", capsize=4)
    left.set_xticks(range(len(names)), names)
    left.set_xlim(-0.5, len(names) - 0.5)
    left.set_title(f"{entry['title']}: mean, 95 % CI")
    left.tick_params(axis="x", labelrotation=20)
    if not tuned:
        return
    wins = [entry["models"][name]["win_rate"] for name in tuned]
    right.bar(tuned, [100 * c["mean"] for c in wins], yerr=error_bars(wins, 100.0), capsize=4, color="#d62728")
    right.axhline(50, color="grey", linestyle="--", linewidth=1)
    right.set_ylim(0, 100)
    right.set_title(f"win rate vs {names[0]} (%), 95 % CI")
    right.tick_params(axis="x", labelrotation=20)


def write_plots(results: dict, output_dir) -> List[str]:
    """``plots/<metric>.png`` per metric; returns the paths relative to ``output_dir``."""
    import matplotlib
    import matplotlib.style
    from matplotlib.figure import Figure

    from fastpref.files import write_atomic

    files = []
    for metric, entry in results["metrics"].items():
        relative = Path("plots") / f"{metric}.png"
        file = Path(output_dir) / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
            figure = Figure(figsize=(8.0, 3.4), layout="constrained")
            draw(entry, figure)
            write_atomic(file, lambda tmp: figure.savefig(tmp, format="png", metadata={"Software": None}))
        files.append(str(relative))
    return files
