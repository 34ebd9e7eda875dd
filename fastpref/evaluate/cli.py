"""``fastpref eval``: compare the base pipeline with trained outputs on a prompt set.

    fastpref eval --pretrained_model_name_or_path BASE --models RUN [RUN2 ...] --prompts P \
        --output_dir OUT [--metrics pickscore hpsv2 ...] [--seeds 0 1 2 3]
    accelerate launch -m fastpref.evaluate ...       # several processes, each a shard

Flags: :class:`fastpref.evaluate.arguments.EvalArguments`; the run:
:func:`fastpref.evaluate.run.evaluate`."""

from __future__ import annotations

import logging
import sys

from fastpref.scorers import MissingExtraError

from .arguments import ArgumentError, build_parser, check
from .run import evaluate, resolve


def main(argv=None) -> int:
    """``fastpref eval``; exit code 2 for bad arguments, prompts, models or a missing extra."""
    parser = build_parser()
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        check(args)
    except ArgumentError as error:
        parser.error(str(error))  # exits 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        plan = resolve(args)
        evaluate(plan)
    except (ValueError, FileNotFoundError, MissingExtraError) as error:
        print(f"fastpref eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
