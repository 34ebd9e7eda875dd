"""``fastpref demo``: Adaptive-DPO's label-flip study (paper Tab. 2 / Tab. 8, Fig. 3) in the toy
world of :mod:`fastpref.demo.world`, trained through fastpref's own trainer, with paired
statistics over seeds. The command builds (or loads) the world and runs the headline study
(every method at every label-flip rate, at the recorded budget); ``--full`` first measures the
budget on DPO's learning curves at 0 % label flips, then runs the headline study at it with
learning curves, u's diagnostics and ablations, and DeDPO at three propensities. Both write
results.json, results.md and the plots; ``--tune`` runs the baseline's tuning grid instead.
docs/demo.md describes the protocol and the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from ..files import write_text_atomic
from ..machine import cpu_model, library_versions
from ..stats import mean_std
from . import plots
from . import world as tw
from .config import (
    CURVE_NOISE_SEED,
    EVAL_NOISE_SEED,
    TUNE_BETAS,
    TUNE_LRS,
    StudyConfig,
    full_config,
    method_defaults,
    quick_config,
)
from .runs import PER_PAIR, RunSpec, budget_specs, core_specs, full_specs, run_all
from .summary import choose_budget, summarize
from .tables import markdown


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    study = quick_config() if args.quick else full_config()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        study = dataclasses.replace(study, seeds=args.seeds)
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    output_dir = Path(args.output_dir)
    _check_output_dir(parser, output_dir)
    threads = torch.get_num_threads()
    # One thread per process: the tiny UNet's ops are too small to split, and on a shared
    # 2-core machine two threads per process oversubscribe it (measured 2-10x slower under load).
    torch.set_num_threads(1)
    try:
        world = build_world(study, output_dir)
        if args.tune:
            run_tuning(world, study, output_dir, jobs, args.tune_betas, args.tune_lrs)
        else:
            run_study(world, study, output_dir, jobs, args.quick, args.full, wall)
        return 0
    finally:
        torch.set_num_threads(threads)


def _check_output_dir(parser: argparse.ArgumentParser, output_dir: Path) -> None:
    """``--output_dir`` is (or is made, here) a folder this process can write in; otherwise
    argparse's usage and a one-line message, exit code 2, before any work."""
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir: {output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        parser.error(f"--output_dir: cannot write in {output_dir} ({error.strerror or error})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpref demo", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output_dir", default="runs/demo", help="where results, plots and the cached world go (default: runs/demo)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI size: a briefly pretrained world, 1 seed, few steps (same JSON layout)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="measure the budget on DPO's learning curves, then add the curves, u's diagnostics and ablations, "
        "and DeDPO at three propensities (about 30 min on 2 cores)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of training seeds (default 5; 2 with --quick)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: min(2, cpu count); 1 = in this process)"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="only run the baseline's tuning grid (DPO at 0 %% label flips) and write tuning.json",
    )
    parser.add_argument(
        "--tune_betas", type=float, nargs="+", default=list(TUNE_BETAS), help="betas of the --tune grid"
    )
    parser.add_argument(
        "--tune_lrs", type=float, nargs="+", default=list(TUNE_LRS), help="learning rates of the --tune grid"
    )
    return parser


def build_world(study: StudyConfig, output_dir: Path) -> tw.World:
    """The study's world from ``output_dir``'s cache, or pretrained (with a progress bar) and cached there."""
    from tqdm.auto import tqdm

    bar = {}

    def progress(stage, done, total):
        if "world" not in bar:
            bar["world"] = tqdm(total=total, desc="pretraining the base model", unit="step", leave=False)
        bar["world"].update(1)

    world = tw.load_or_build(study.world, output_dir, progress=progress)
    if "world" in bar:
        bar["world"].close()
    return world


def run_study(
    world: tw.World, study: StudyConfig, output_dir: Path, jobs: int, quick: bool, full: bool, wall: float
) -> dict:
    """Every run of the study, its results and their files: results.json, results.md (also
    printed) and the plots (when matplotlib, the ``demo`` extra, is installed). Without ``full``
    the headline study runs at ``study.steps``; with it, the budget is measured first."""
    from tqdm.auto import tqdm

    if not plots.available():
        print("matplotlib is not installed (pip install 'fastpref[demo]'): no plots will be drawn", file=sys.stderr)
    records, budget, steps = [], None, study.steps
    if full:
        specs = budget_specs(study)
        with tqdm(total=len(specs), desc="DPO learning curves (budget)", unit="run") as progress:
            records = run_all(specs, world, study, output_dir, jobs, lambda r: progress.update(1))
        budget = choose_budget(records)
        budget["configured_steps"] = study.steps
        steps = budget["steps"]
        print(f"budget: {steps} steps (DPO's curve at 0 % label flips peaks there; the core study's is {study.steps})")
    specs = full_specs(study, steps) if full else core_specs(study, steps)
    with tqdm(total=len(specs), desc="demo runs", unit="run") as progress:
        records += run_all(specs, world, study, output_dir, jobs, lambda r: progress.update(1))
    results = summarize(records, world, study, budget)
    results.update(run_metadata(records, world, study, jobs, quick, full))
    results["plots"] = plots.write_plots(results, output_dir) if plots.available() else []
    results["wall_seconds"] = time.perf_counter() - wall
    table = write_results(results, output_dir)
    print(table)
    print(
        f"wrote {output_dir / 'results.json'}, {output_dir / 'results.md'} and {', '.join(results['plots'])} "
        f"in {results['wall_seconds']:.0f} s"
    )
    return results


def run_metadata(
    records: Sequence[dict], world: tw.World, study: StudyConfig, jobs: int, quick: bool, full: bool
) -> dict:
    """What the results were made with: sizes, hyper-parameters, machine, library versions,
    timings, and every run's record without its per-pair arrays."""
    return dict(
        quick=bool(quick),
        full=bool(full),
        hyperparameters={
            "study": study.to_dict(),
            "methods": method_defaults(),
            "jobs": jobs,
            "eval_noise_seed": EVAL_NOISE_SEED,
            "curve_noise_seed": CURVE_NOISE_SEED,
        },
        machine=machine(jobs),
        torch=torch.__version__,
        libraries=libraries(),
        world_cache=str(world.path),
        world_build_seconds=world.built_seconds,
        run_seconds_total=float(sum(r["seconds"] for r in records)),
        runs=[{k: v for k, v in r.items() if k not in PER_PAIR} for r in records],
    )


def write_results(results: dict, output_dir: Path) -> str:
    """Write results.md (a header naming the command and machine, then the tables) and
    results.json; returns the tables."""
    table = markdown(results)
    host = results["machine"]
    flags = (" --quick" if results["quick"] else "") + (" --full" if results["full"] else "")
    default_seeds = (quick_config() if results["quick"] else full_config()).seeds
    flags += f" --seeds {results['seeds']}" if results["seeds"] != default_seeds else ""
    header = (
        f"# fastpref demo\n\n`fastpref demo{flags}` on {host['cpu'] or host['platform']} ({host['cpu_count']} cores, "
        f"{host['jobs']} worker processes of {host['threads_per_process']} thread), torch {results['torch']}, "
        f"{results['wall_seconds']:.0f} s wall.\n\n"
    )
    write_text_atomic(output_dir / "results.md", header + table)
    write_text_atomic(output_dir / "results.json", json.dumps(_json_ready(results), indent=1))
    return table


def machine(jobs: int) -> dict:
    """The machine the study ran on, and how: worker processes and threads per process."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jobs": jobs,
        "threads_per_process": 1,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }


def libraries() -> dict:
    """The versions of the libraries the results depend on."""
    return library_versions(("torch", "diffusers", "accelerate", "numpy", "matplotlib", "fastpref"))


def _json_ready(obj):
    """``obj`` with numpy scalars as Python numbers and non-finite floats as None (JSON's null)."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_tuning(
    world: tw.World, study: StudyConfig, output_dir: Path, jobs: int, betas: Sequence[float], lrs: Sequence[float]
) -> List[dict]:
    """``--tune``: the baseline's grid at the study's step budget; writes tuning.json and prints a
    line per grid point."""
    from tqdm.auto import tqdm

    betas, lrs, steps = tuple(betas), tuple(lrs), (study.steps,)
    with tqdm(total=len(betas) * len(lrs) * study.seeds, desc="tuning DPO at 0 % label flips", unit="run") as progress:
        rows = tune(world, study, output_dir, jobs, betas, lrs, steps, lambda r: progress.update(1))
    grid = {"base_reward": world.base_reward["mean"], "grid": rows}
    write_text_atomic(output_dir / "tuning.json", json.dumps(_json_ready(grid), indent=1))
    for row in rows:
        print(
            f"beta {row['beta']:g} lr {row['learning_rate']:g} steps {row['steps']}: "
            f"reward {row['reward']:.4f} ± {row['reward_std']:.4f} (gain {row['gain']:+.4f}) {row['seconds']:.1f} s/run"
        )
    return rows


def tune(
    world: tw.World,
    study: StudyConfig,
    cache_dir: Path,
    jobs: int,
    betas: Sequence[float],
    lrs: Sequence[float],
    steps: Sequence[int],
    progress=None,
) -> List[dict]:
    """DPO at 0 % label flips over a grid of beta x learning rate x steps, every seed: the only runs
    the baseline's hyper-parameters were chosen from. Returns one row per grid point."""
    specs = [
        RunSpec("tune", "dpo", 0, seed, n, table_step=n, beta=b, learning_rate=lr)
        for b in betas
        for lr in lrs
        for n in steps
        for seed in range(study.seeds)
    ]
    records = run_all(specs, world, study, cache_dir, jobs, progress)
    rows = []
    for b in betas:
        for lr in lrs:
            for n in steps:
                runs = [r for r in records if r["beta"] == b and r["learning_rate"] == lr and r["steps"] == n]
                m, s = mean_std([r["reward"] for r in runs])
                rows.append(
                    {
                        "beta": b,
                        "learning_rate": lr,
                        "steps": n,
                        "reward": m,
                        "reward_std": s,
                        "gain": m - world.base_reward["mean"],
                        "seconds": float(np.mean([r["seconds"] for r in runs])),
                    }
                )
    return rows


if __name__ == "__main__":
    sys.exit(main())
