"""``fastpref train``: the command that fine-tunes a diffusion model (SD 1.5, SDXL: see
:mod:`fastpref.train.families`) on Pick-a-Pic preference pairs.

    fastpref train --pretrained_model_name_or_path MODEL --dataset_name DATA --output_dir OUT [...]
    accelerate launch -m fastpref.train ...          # several processes (DDP)

Its flags are :mod:`fastpref.train.arguments`' (names as diffusers' ``train_diffusion_dpo.py``
where the concept is the same); :func:`fastpref.train.run.resolve` checks and resolves them
once, :func:`fastpref.train.run.train` runs the result.
"""

from __future__ import annotations

import sys

from .arguments import ArgumentError, build_parser, given_flags, parse_args
from .run import resolve, train
from .trainer import NonFiniteLossError


def main(argv=None) -> int:
    """``fastpref train``; exit code 2 for bad arguments (argparse's usage and message) or data,
    3 for a non-finite abort."""
    parser = build_parser()
    data_args, settings, run = parse_args(argv, parser)
    try:
        plan = resolve(data_args, settings, run, given_flags(argv, parser))
    except ArgumentError as error:
        parser.error(str(error))  # exits 2
    if plan.run.print_memory_plan:
        from .memory_plan import report

        print(report(plan))
        return 0
    try:
        train(plan)
    except (ValueError, FileNotFoundError) as error:
        print(f"fastpref train: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:  # the message says what to do
        print(f"fastpref train: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
