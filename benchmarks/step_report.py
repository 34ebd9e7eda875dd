"""The step benchmark's printed report: what ran on what, the step-time table, the targets
checked on the run, and where the time goes."""

from __future__ import annotations

from typing import List

import torch
from report import markdown
from step_mode import AUTHORS_H100, GOAL_ADAPTIVE, GOAL_DPO
from step_timing import REST, SUB_PHASES, TOP_PHASES


def print_header(args, machine: str, device: torch.device, load_start) -> None:
    """What is measured, on what, with which versions; a warning when other jobs load the CPU."""
    import accelerate
    import diffusers
    import peft

    threads = torch.get_num_threads()
    print(
        f"# fastpref step benchmark on {machine}: model {args.model}, {args.batch} pairs "
        f"({2 * args.batch} samples) at {args.resolution} px, {args.dtype}, LoRA rank(s) {args.lora_ranks} "
        f"(0 = full fine-tune), {threads} CPU thread(s)\n"
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"accelerate {accelerate.__version__}; load average {load_start[0]:.2f}",
        flush=True,
    )
    if device.type == "cpu" and load_start[0] > 1.5 and threads > 1:
        print(
            f"(load average {load_start[0]:.2f}: other jobs share the CPU; with {threads} threads "
            "OpenMP stalls may dominate -- consider --threads 1)",
            flush=True,
        )


def print_report(args, modes: List[dict], context: str) -> None:
    """The step-time table, the targets checked on this run, and where the time goes."""
    print_step_table(args, modes)
    print_goals(modes, context)
    print_breakdowns(args, modes)


def print_step_table(args, modes: List[dict]) -> None:
    rows = [row for m in modes for row in m.get("rows", [])]
    print(f"\n## Step time, median of {args.steps} interleaved rounds ({2 * args.batch} samples per step)\n")
    columns = ["mode", "label", "ms", "samples_per_s", "vs_dpo_cached", "fastpref_over_authors"]
    columns += ["cpu_ms", "cpu_vs_dpo_cached"]
    formats = {
        "ms": "{:.1f}",
        "cpu_ms": "{:.1f}",
        "cpu_vs_dpo_cached": "{:.2f}x",
        "samples_per_s": "{:.1f}",
        "vs_dpo_cached": "{:.2f}x",
        "fastpref_over_authors": "{:.2f}x",
    }
    print(markdown(rows, columns, formats))
    print(
        "\n(vs_dpo_cached: step time over the latent-cached DPO step of the same mode; fastpref_over_authors: "
        "the fastpref row's step time over the authors' row with the same caching; cpu_ms: the process's CPU time "
        "per step, which other jobs on a shared CPU inflate less than the wall time, and its ratio)"
    )


def _met(goal: dict) -> str:
    return "MET" if goal["met"] else "NOT MET"


def print_goals(modes: List[dict], context: str) -> None:
    """Each mode's ratios against the targets (stated for SD1.5 on an H100) on this run."""
    print("\n## Targets (stated for SD1.5 on an H100), on this run\n")
    for m in modes:
        g = m.get("goals", {})
        if "error" in m:
            print(f"- {m['mode']}: not measured ({m['error']})")
            continue
        if "adaptive_vs_dpo_cached" in g:
            a = g["adaptive_vs_dpo_cached"]
            authors = (
                ""
                if a["authors_uncached_vs_dpo_cached"] is None
                else f"; the authors' method here: {a['authors_uncached_vs_dpo_cached']:.2f}x "
                f"(their reference: {AUTHORS_H100} on H100)"
            )
            print(
                f"- {m['mode']}: Adaptive K=2 / DPO cached = {a['value']:.2f}x, goal <= {GOAL_ADAPTIVE}x: "
                f"{_met(a)} ({context}){authors}; in CPU time {a['cpu_value']:.2f}x"
            )
        if "dpo_samples_per_s_vs_diffusers_script" in g:
            d = g["dpo_samples_per_s_vs_diffusers_script"]
            print(
                f"- {m['mode']}: DPO samples/s cached / diffusers' script = {d['value']:.2f}x, "
                f"goal >= {GOAL_DPO}x: {_met(d)} ({context})"
            )
        if "fastpref_speedup_over_authors" in g:
            s = g["fastpref_speedup_over_authors"]
            extra = (
                ""
                if s["fastpref_cached_vs_authors_way"] is None
                else "; fastpref cached vs the authors' way (uncached): "
                f"{s['fastpref_cached_vs_authors_way']:.2f}x faster"
            )
            print(
                f"- {m['mode']}: fastpref Adaptive vs the authors', both uncached: "
                f"{s['same_caching_uncached']:.2f}x faster{extra}"
            )


def print_breakdowns(args, modes: List[dict]) -> None:
    """Per mode, the median ms of each phase per variant, and the batched-forward probe."""
    for m in modes:
        if not m.get("breakdown"):
            continue
        names = ["step", *TOP_PHASES, REST, *SUB_PHASES]
        present = [n for n in names if any(n in b for b in m["breakdown"].values())]
        print(
            f"\n## {m['mode']}: where the time goes (ms, median of {args.breakdown_rounds} rounds "
            "with a device sync around each phase)\n"
        )
        table = [{"variant": k, **{n: b.get(n) for n in present}} for k, b in m["breakdown"].items()]
        print(markdown(table, ["variant", *present], {n: "{:.1f}" for n in present}))
        p = m.get("batched_probe")
        if p:
            print(
                f"\nno-grad forwards: 3 x {2 * args.batch} samples {p['three_fwd_2B_ms']:.1f} ms vs "
                f"1 x {6 * args.batch} samples {p['one_fwd_6B_ms']:.1f} ms "
                f"(saving {p['saving_ms']:.1f} ms per step at most)"
            )
