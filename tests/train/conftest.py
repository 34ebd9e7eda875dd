"""Fixtures of the crash-safety and argument tests: one tiny sd15 pipeline and 12 toy pairs at
32 px (the issue's reproduction), and ``fastpref train`` on them in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--resolution", "32", "--train_batch_size", "2", "--lora_rank", "4", "--report_to", "none", "--no_progress"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``{"model": path, "data": path}``: ``fastpref make-tiny-model M --arch sd15`` and
    ``fastpref make-toy-data D --pairs 12 --resolution 32``."""
    from fastpref import cli

    root = tmp_path_factory.mktemp("tiny_run")
    assert cli.main(["make-tiny-model", str(root / "M"), "--arch", "sd15", "--seed", "0"]) == 0
    assert cli.main(["make-toy-data", str(root / "D"), "--pairs", "12", "--resolution", "32"]) == 0
    return {"model": root / "M", "data": root / "D"}


def tiny_args(tiny_run, out, *extra) -> list:
    """The arguments of a quick ``fastpref train`` run into ``out`` (``extra`` last, so they win)."""
    paths = ["--pretrained_model_name_or_path", str(tiny_run["model"]), "--dataset_name", str(tiny_run["data"])]
    return [*paths, "--output_dir", str(out), *QUICK, *map(str, extra)]


@pytest.fixture
def train_subprocess(tiny_run):
    """``run(out, *extra, fault=None, check=True)``: ``fastpref train`` in a subprocess, with
    ``FASTPREF_FAULT=save:<fault>`` when given; the ``CompletedProcess``."""

    def run(out, *extra, fault=None, check=True):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("FASTPREF_FAULT", None)
        if fault:
            env["FASTPREF_FAULT"] = f"save:{fault}"
        command = [sys.executable, "-m", "fastpref.cli", "train", *tiny_args(tiny_run, out, *extra)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"train failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result

    return run


@pytest.fixture
def train_main(tiny_run, capsys):
    """``run(out, *extra)``: ``fastpref train``'s ``main`` in this process: ``(exit code, stderr)``."""
    from fastpref.train.cli import main

    def run(out, *extra):
        try:
            code = main(tiny_args(tiny_run, out, *extra))
        except SystemExit as exit_:
            code = exit_.code
        return code, capsys.readouterr().err

    return run
