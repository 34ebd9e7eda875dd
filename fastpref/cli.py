"""The ``fastpref`` command line.

fastpref info             which backends run here, and why the others do not
fastpref make-tiny-model DIR --arch sd15|sdxl [--seed N]
                          a tiny random-weight diffusers pipeline, loadable offline
fastpref make-toy-data DIR --pairs N [--resolution R --seed S --ties T --corrupt C --judge]
                          generated preference pairs in the Pick-a-Pic v2 parquet schema
fastpref train --pretrained_model_name_or_path M --dataset_name D --output_dir O [...]
                          Diffusion-DPO / Adaptive-DPO fine-tuning (``fastpref train --help``)
fastpref eval --pretrained_model_name_or_path M --models RUN --prompts P --output_dir O [...]
                          base vs trained outputs: reward models, paired win rates (``fastpref eval --help``)
fastpref demo [--quick | --full]
                          the toy-world label-flip study (the README's main job)
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _info(argv) -> int:
    parser = argparse.ArgumentParser(prog="fastpref info", description="Show which backends can run on each device.")
    parser.parse_args(argv)
    import torch

    import fastpref
    from fastpref.loss import dispatch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"fastpref {fastpref.__version__}, torch {torch.__version__}")
    for device in devices:
        print(f"{device}: auto -> {dispatch.auto_backend(torch.device(device))}")
        for name, reason in fastpref.availability(device).items():
            print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    if "cuda" not in devices:
        native_cuda = dispatch.native_unavailable(torch.device("cuda"))
        print(
            f"cuda: no CUDA device here (torch.version.cuda = {torch.version.cuda}); native CUDA kernels "
            f"{'built' if native_cuda is None else 'unavailable: ' + native_cuda}"
        )
    return 0


def _module_main(module: str):
    """A command that imports ``fastpref.<module>`` only when run (the trainer's extras are heavy)
    and calls its ``main(argv)``."""

    def command(argv) -> int:
        return importlib.import_module(f"fastpref.{module}").main(argv)

    return command


COMMANDS = {
    "info": _info,
    "make-tiny-model": _module_main("testing.tiny_model"),
    "make-toy-data": _module_main("testing.toy_data"),
    "train": _module_main("train.cli"),
    "eval": _module_main("evaluate.cli"),
    "demo": _module_main("demo.study"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(
            prog="fastpref", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument("command", choices=sorted(COMMANDS))
        parser.parse_args(argv[:1])  # prints usage and exits for a missing or unknown command
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
