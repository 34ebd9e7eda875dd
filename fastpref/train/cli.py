"""``fastpref train``: the command that fine-tunes a diffusion model (SD 1.5, SDXL: see
:mod:`fastpref.train.families`) on Pick-a-Pic preference pairs.

    fastpref train --pretrained_model_name_or_path MODEL --dataset_name DATA --output_dir OUT [...]
    accelerate launch -m fastpref.train ...          # several processes (DDP)

Its flags are :mod:`fastpref.train.arguments`' (names as diffusers' ``train_diffusion_dpo.py``
where the concept is the same); :func:`fastpref.train.run.resolve` checks and resolves them
once, :func:`fastpref.train.run.train` runs the result.
"""

from __future__ import annotations

import errno
import signal
import sys

from ..files import is_disk_full
from .arguments import ArgumentError, build_parser, given_flags, parse_args
from .loop import Interrupted
from .run import resolve, train
from .trainer import NonFiniteLossError


def main(argv=None) -> int:
    """``fastpref train``; exit code 2 for bad arguments (argparse's usage and message), bad data
    or a full disk, 3 for a non-finite abort, 128 + the signal's number for SIGINT (130) or
    SIGTERM (143)."""
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
        print(f"fastpref train: error: {error_line(error)}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(
            f"fastpref train: {signal.Signals(stop.signum).name} at step {stop.step}: saved {stop.checkpoint}; "
            "continue with --resume_from_checkpoint latest",
            file=sys.stderr,
        )
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("fastpref train: stopped at once (a second signal); the newest checkpoint is intact", file=sys.stderr)
        return 128 + signal.SIGINT
    except NonFiniteLossError as error:  # the message says what to do
        print(f"fastpref train: {error}", file=sys.stderr)
        return 3
    except Exception as error:  # a full disk, however the writer reports it: one line
        if not is_disk_full(error):
            raise
        print(f"fastpref train: error: {disk_full_line(error)}", file=sys.stderr)
        return 2
    return 0


def error_line(error: Exception) -> str:
    """The error's message on one line. An error raised in a DataLoader worker is re-raised by
    torch with the worker's traceback in its message; its last line ("module.Class: message")
    holds the message."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def disk_full_line(error: Exception) -> str:
    """The line that names a full disk: the path the writer was writing where it is known."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        if str(error.strerror).startswith("no space left on the device"):  # disk_full_named's: it names the path
            return error.strerror
        if error.filename:
            return f"no space left on the device while writing {error.filename}"
    return f"no space left on the device ({error})"


if __name__ == "__main__":
    sys.exit(main())
