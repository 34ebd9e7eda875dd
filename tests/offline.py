"""Offline fixtures shared by the trainer, data and fixture tests (a pytest plugin, loaded by
``tests/conftest.py``): the tiny pipelines and the toy pairs, written through the ``fastpref``
command as a user would, with the Hugging Face Hub switched off."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Both tiny pipelines (``fastpref make-tiny-model``): ``{"sd15": path, "sdxl": path}``."""
    from fastpref import cli

    root = tmp_path_factory.mktemp("models")
    paths = {}
    for arch in ("sd15", "sdxl"):
        paths[arch] = root / arch
        assert cli.main(["make-tiny-model", str(paths[arch]), "--arch", arch, "--seed", "0"]) == 0
    return paths


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
