"""``eval.md``: the evaluation's tables, one per metric, from the ``eval.json`` dictionary."""

from __future__ import annotations

from typing import Optional


def number(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def with_interval(cell: Optional[dict], signed: bool = False, percent: bool = False) -> str:
    """``mean [low, high]`` (``–`` for a missing interval: one prompt)."""
    if cell is None:
        return "–"
    scale = 100.0 if percent else 1.0
    values = [None if cell[k] is None else scale * cell[k] for k in ("mean", "low", "high")]
    unit = " %" if percent else ""
    if values[1] is None:
        return f"{number(values[0], signed)}{unit}"
    return f"{number(values[0], signed)}{unit} [{number(values[1], signed)}, {number(values[2], signed)}]"


def markdown(results: dict) -> str:
    """The evaluation as Markdown: what was compared, then per metric a table of each model's
    mean, its paired difference to the base and its win rate, with 95 % intervals."""
    p, s = results["num_prompts"], results["num_seeds"]
    g = results["generation"]
    lines = [
        "# fastpref eval",
        "",
        f"Base `{results['base']}` ({g['family']}); {p} prompts ({results['prompts']['source']}) x {s} seeds "
        f"({', '.join(map(str, results['seeds']))}), {g['resolution']} px, {g['num_inference_steps']} steps, "
        f"guidance {g['guidance_scale']}, mixed precision {g['mixed_precision']}.",
        "",
        f"Each model's score per prompt is its mean over the {s} seeds; intervals are 95 % t-intervals over the "
        f"{p} prompts. '− base' is the paired difference (same prompt, same seeds); the win rate is the share of "
        "(prompt, seed) where the model scores above the base, ties counting one half.",
        "",
    ]
    for model in results["models"][1:]:
        lines.append(f"- `{model['name']}`: {model['kind']} `{model['path']}`")
    for metric, entry in results["metrics"].items():
        lines += [
            "",
            f"## {entry['title']} ({entry['scale']})",
            "",
            f"{p} prompts x {s} seeds; reference: {entry['reference']}.",
            "",
            "| model | mean [95 % CI] | − base, paired [95 % CI] | win rate vs base [95 % CI] |",
            "|---|---|---|---|",
        ]
        for name, row in entry["models"].items():
            lines.append(
                f"| {name} | {with_interval(row['mean'])} | {with_interval(row.get('difference'), signed=True)} "
                f"| {with_interval(row.get('win_rate'), percent=True)} |"
            )
    if results.get("grids"):
        lines += ["", "## Grids", "", "Base (left) and each model (right), first seed, one prompt a row:", ""]
        lines += [f"- [{file}]({file})" for file in results["grids"]]
        lines += [f"  {i + 1}. {prompt}" for i, prompt in enumerate(results["grid_prompts"])]
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{file}]({file})" for file in results["plots"]]
    return "\n".join(lines) + "\n"
