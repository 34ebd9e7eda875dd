"""Step benchmark of the preference trainer: ``python benchmarks/bench_step.py [--quick] [--model MODEL]``.

Times one optimizer step of :class:`fastpref.train.PreferenceTrainer` for DPO and Adaptive-DPO
(K = 2) with fastpref's on-device footprints and with the authors' footprint handling
re-implemented on the same trainer (``benchmarks/step_authors.py``), each with latents cached or
encoded every step (the variants and the method: ``benchmarks/step_mode.py``; the models:
``benchmarks/step_models.py``; the timers: ``benchmarks/step_timing.py``), and writes a markdown
report (``benchmarks/step_report.py``) and a JSON file of every raw timing.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch

if not torch.cuda.is_available():  # as benchmarks/bench_loss.py: must precede any import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from report import result_path, slug, write_json  # noqa: E402
from step_mode import DECAYS, MIXED_PRECISION, VARIANTS, run_mode  # noqa: E402
from step_models import FAMILIES, MODELS, Components, build_components, make_batches  # noqa: E402
from step_report import print_header, print_report  # noqa: E402
from step_timing import synchronizer  # noqa: E402

from fastpref.machine import device_name, library_versions  # noqa: E402

QUICK = dict(steps=3, warmup=1, breakdown_rounds=1, batch=2)
DEFAULTS = dict(steps=20, warmup=3, breakdown_rounds=3)


def parse_args(argv=None):
    """The command line, with the model's and the preset's defaults filled in and checked."""
    parser = make_parser()
    args = parser.parse_args(argv)
    fill_defaults(args, parser)
    check_args(args, parser)
    return args


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        default="tiny",
        help="tiny (SD1.5, CPU, default), tiny-sd3 / tiny-flux (the flow families, CPU), or with random weights "
        "at the published sizes (GPU, bf16): sd15-random, sd35m-random (SD3.5 Medium), flux-random (FLUX.1 dev)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed interleaved rounds, one step per variant each "
        f"(default {DEFAULTS['steps']}; quick {QUICK['steps']})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed rounds first (default {DEFAULTS['warmup']}; quick {QUICK['warmup']})",
    )
    parser.add_argument(
        "--breakdown_rounds",
        type=int,
        default=None,
        help="extra rounds with per-phase timers; 0 = none "
        f"(default {DEFAULTS['breakdown_rounds']}; quick {QUICK['breakdown_rounds']})",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=tuple(MIXED_PRECISION),
        default=None,
        help="mixed precision of the step (default: the model's: tiny ones fp32, *-random bf16)",
    )
    parser.add_argument(
        "--lora_rank", default="8", help="LoRA rank; 0 = full fine-tune; a comma list runs each mode (e.g. 8,0)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels (default: the model's: tiny 64, sd15-random 512, sd35m-random 1024, "
        "flux-random 512)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="pairs per step (default: the model's: tiny 4, sd15-random 8, sd35m-random 2, flux-random 1; quick 2)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); "
        "1 avoids the OpenMP oversubscription stalls of a CPU shared with other jobs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few rounds of 2 pairs: a smoke run")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step-<machine>.json)")
    parser.add_argument(
        "--time_budget",
        type=float,
        default=None,
        help="seconds from the start: no new timed round (after the first) nor breakdown begins past it",
    )
    return parser


def fill_defaults(args, parser: argparse.ArgumentParser) -> None:
    """The settings left unset, from ``--model`` and ``--quick``; the lists parsed."""
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error("--time_budget must be > 0 seconds")
    args.deadline = None if args.time_budget is None else time.perf_counter() + args.time_budget
    model = MODELS[args.model]
    preset = QUICK if args.quick else DEFAULTS
    for name in ("steps", "warmup", "breakdown_rounds"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.resolution = args.resolution or model["resolution"]
    args.batch = args.batch or (QUICK["batch"] if args.quick else model["batch"])
    args.dtype = args.dtype or model["dtype"]
    try:
        args.lora_ranks = [int(r) for r in args.lora_rank.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--lora_rank: a comma list of ints, got {args.lora_rank!r}")
    args.variant_keys = [k.strip() for k in args.variants.split(",") if k.strip()]


def check_args(args, parser: argparse.ArgumentParser) -> None:
    """Stop with the usage where a setting is out of range."""
    unknown = [k for k in args.variant_keys if k not in VARIANTS]
    if unknown or not args.variant_keys:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if (
        args.steps < 1
        or args.warmup < 0
        or args.breakdown_rounds < 0
        or args.batch < 1
        or any(r < 0 for r in args.lora_ranks)
        or not args.lora_ranks
    ):
        parser.error("--steps >= 1, --warmup >= 0, --breakdown_rounds >= 0, --batch >= 1, --lora_rank >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    family = FAMILIES[MODELS[args.model]["family"]]
    if args.resolution % family.resolution_multiple:
        parser.error(f"--resolution must be a multiple of {family.resolution_multiple} for {family.title}")


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    machine = device_name(device)
    load_start = os.getloadavg()
    print_header(args, machine, device, load_start)
    with tempfile.TemporaryDirectory(prefix="fastpref-bench-step-") as tmp:
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
        components = build_components(args.model, device, weight_dtype, Path(tmp), args.seed)
        batches = make_batches(components, args.batch, args.resolution, args.seed)
        if not any(key.endswith("/uncached") for key in args.variant_keys):
            components.release_encoders()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        modes = [run_mode_on_fresh_accelerator(args, rank, components, batches, device) for rank in args.lora_ranks]
    load = {"start": list(load_start), "end": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    load["under_load"] = device.type == "cpu" and max(load["start"][0], load["end"][0]) > 1.5
    wall = time.perf_counter() - started

    print_report(args, modes, f"{args.model} at {args.resolution} px on {machine}")
    if load["under_load"]:
        print(
            f"\nNOTE: load average {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end "
            f"(> 1.5 on {os.cpu_count()} cores): figures taken under load from other processes."
        )
    print(f"\nwall time {wall:.1f} s")

    report = {
        "benchmark": "step",
        "device": machine,
        "command": " ".join(
            ["python", "benchmarks/bench_step.py", *argv] if argv is not None else ["python", *sys.argv]
        ),
        "versions": versions(),
        "config": run_config(args, components, batches, device),
        "load_average": load,
        "wall_s": wall,
        "modes": modes,
    }
    output = output_path(args, machine)
    write_json(output, report)
    print(f"wrote {output}")
    return 0


def run_mode_on_fresh_accelerator(args, rank: int, components: Components, batches, device: torch.device) -> dict:
    """:func:`run_mode` with an accelerator of its own, released afterwards (its references to
    the mode's models go with it); out of device memory is recorded and the next mode goes on."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[args.dtype], cpu=device.type == "cpu")
    if accelerator.device.type != device.type or (accelerator.device.index or 0) != (device.index or 0):
        raise RuntimeError(f"accelerate chose {accelerator.device}, the benchmark asked for {device}")
    try:
        return run_mode(args, rank, args.variant_keys, components, batches, accelerator, synchronizer(device))
    except torch.cuda.OutOfMemoryError as error:
        mode = f"lora-r{rank}" if rank > 0 else "full"
        print(
            f"{mode}: out of device memory with the variants {args.variant_keys} alive ({error}); "
            "run fewer with --variants",
            flush=True,
        )
        return {"mode": mode, "lora_rank": rank, "error": f"CUDA out of memory: {error}"}
    finally:
        accelerator.free_memory()
        del accelerator
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def versions() -> Dict[str, str]:
    """The versions of the libraries a step runs through."""
    names = ("torch", "diffusers", "transformers", "peft", "accelerate", "fastpref")
    return {**library_versions(names), "python": sys.version.split()[0]}


def run_config(args, components: Components, batches, device: torch.device) -> dict:
    """The run's settings, for the JSON report."""
    return {
        "model": args.model,
        "model_description": components.description,
        "resolution": args.resolution,
        "latent_shape": list(batches[1]["latents"].shape[1:]),
        "pairs_per_step": args.batch,
        "samples_per_step": 2 * args.batch,
        "dtype": args.dtype,
        "device": str(device),
        "lora_ranks": args.lora_ranks,
        "variants": args.variant_keys,
        "steps": args.steps,
        "time_budget_s": args.time_budget,
        "warmup": args.warmup,
        "breakdown_rounds": args.breakdown_rounds,
        "ema_decays": list(DECAYS),
        "metric_warmup_steps": 0,
        "loss_backend": "auto",
        "family": components.family.name,
        "beta": components.family.defaults.beta,
        "k1": components.family.defaults.k1,
        "seed": args.seed,
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
    }


def output_path(args, machine: str) -> Path:
    """``--out``, else ``benchmarks/results/[quick-]step[-<model>]-<machine>.json``."""
    if args.out:
        return Path(args.out)
    stem = "step" if args.model == "tiny" else f"step-{args.model}"
    return result_path(f"{stem}-{slug(machine)}", args.quick)


if __name__ == "__main__":
    sys.exit(main())
