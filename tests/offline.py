"""Offline fixtures shared by the trainer, data and fixture tests (a pytest plugin, loaded by
``tests/conftest.py``): the tiny pipelines and the toy pairs, written through the ``fastpref``
command as a user would, with the Hugging Face Hub switched off, and ``fastpref train`` run on
them (the crash-safety and argument tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RES = 32
PAIRS, TIES, CORRUPT = 24, 3, 1


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hub switched off for the test, also where huggingface_hub has read its settings."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def make_tiny_models(tmp_path_factory, folder: str, archs) -> dict:
    """``{arch: path}``: each tiny pipeline of ``archs`` written by ``fastpref make-tiny-model``."""
    from fastpref import cli

    root = tmp_path_factory.mktemp(folder)
    paths = {arch: root / arch for arch in archs}
    for arch, path in paths.items():
        assert cli.main(["make-tiny-model", str(path), "--arch", arch, "--seed", "0"]) == 0
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Both tiny pipelines (``fastpref make-tiny-model``): ``{"sd15": path, "sdxl": path}``."""
    return make_tiny_models(tmp_path_factory, "models", ("sd15", "sdxl"))


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory):
    """The tiny flow-matching pipelines (``fastpref make-tiny-model --arch sd3|flux``): ``{"sd3":
    path, "flux": path}`` (FLUX.1 dev's layout, with its guidance embedding)."""
    return make_tiny_models(tmp_path_factory, "flow_models", ("sd3", "flux"))


def write_toy(root, *extra):
    """``PAIRS`` toy pairs at ``RES`` px with ``TIES`` ties and ``CORRUPT`` undecodable rows
    (``fastpref make-toy-data``; ``extra``: more flags); returns the parquet file."""
    from fastpref import cli

    args = ["make-toy-data", str(root), "--pairs", str(PAIRS), "--resolution", str(RES)]
    args += ["--ties", str(TIES), "--corrupt", str(CORRUPT), *extra]
    assert cli.main(args) == 0
    return root / "train.parquet"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def toy_judge(tmp_path_factory):
    """The ``toy`` rows plus the judge's column (``--judge``)."""
    return write_toy(tmp_path_factory.mktemp("toy_judge"), "--judge")


# ``fastpref train`` on one tiny sd15 pipeline and 12 toy pairs at 32 px.

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """``{"model": path, "vae": path}``: ``fastpref make-tiny-model M --arch sdxl`` and a copy of
    its VAE marked fp16-safe (``force_upcast: false``, as ``madebyollin/sdxl-vae-fp16-fix``)."""
    import json
    import shutil

    from fastpref import cli

    root = tmp_path_factory.mktemp("tiny_sdxl")
    assert cli.main(["make-tiny-model", str(root / "M"), "--arch", "sdxl", "--seed", "0"]) == 0
    shutil.copytree(root / "M" / "vae", root / "vae-fp16-fix")
    config_file = root / "vae-fp16-fix" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "force_upcast": False}))
    return {"model": root / "M", "vae": root / "vae-fp16-fix"}


# The Hugging Face datasets cache (the Arrow files that ``fastpref train`` makes of parquet data):
# a temporary folder for the session, set before ``datasets`` is imported, inherited by subprocesses.
def _datasets_cache() -> str:
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="fastpref-hf-datasets-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = _datasets_cache()
