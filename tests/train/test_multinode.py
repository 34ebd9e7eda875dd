"""Several machines are accelerate's: two "machines" on this host (``accelerate launch
--num_machines 2 --machine_rank 0|1``, one process each, gloo) train the tiny SD 1.5 UNet with
``--fsdp`` and ``--run_validation`` into one folder both see. The full comparison with a
one-machine run (DDP and ``--fsdp``, bitwise) is ``python benchmarks/check_fsdp.py --multinode``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_machines(args: list, port: int, env: dict) -> list:
    """Start ``fastpref train args`` as machines 0 and 1 of 2 (one process each) side by side;
    returns their completed processes."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    machines = [
        subprocess.Popen(
            [*launch, "--machine_rank", str(rank), "-m", "fastpref.train", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for machine in machines:
        machine.communicate(timeout=600)
    return machines


@pytest.mark.skipif(sys.platform != "linux", reason="CPU process groups through gloo are exercised on Linux")
def test_two_machines_train_sharded_and_validate(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastpref.testing.tiny_model import make_tiny_model
    from fastpref.testing.toy_data import make_toy_data

    make_tiny_model(tmp_path / "sd15", arch="sd15")
    make_toy_data(tmp_path / "data", pairs=8)
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", str(tmp_path / "sd15"), "--dataset_name", str(tmp_path / "data")]
    args += ["--output_dir", str(out), "--resolution", "64", "--no_progress", "--lora_rank", "0", "--fsdp"]
    args += ["--loss_type", "dpo", "--train_batch_size", "2", "--max_train_steps", "1", "--report_to", "tensorboard"]
    args += ["--run_validation", "--validation_steps", "1", "--validation_inference_steps", "2"]
    args += ["--validation_prompts", "a red fox", "a blue car", "a green hill"]  # 3 on 2 processes: one pads
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "FASTPREF_BACKEND": "torch"}
    machines = launch_machines(args, free_port(), env)
    assert [m.returncode for m in machines] == [0, 0], machines[0].stdout[-3000:] + machines[1].stdout[-3000:]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["state"] == "finished" and summary["processes"] == 2
    checkpoint = out / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert sorted(p.name for p in (checkpoint / "sharded_state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(out.glob("*.partial")) and not list(out.glob(".fastpref.shared"))
    assert sorted(p.name for p in (out / "validation" / "step-1").iterdir()) == ["00.png", "01.png", "02.png"]
    events = [EventAccumulator(str(f.parent)).Reload() for f in out.glob("logs/**/events.out.tfevents.*")]
    images = [e.Images("validation") for e in events if "validation" in e.Tags()["images"]]
    assert len(images) == 1 and [(i.step, i.width) for i in images[0]] == [(1, 3 * 64)]  # the 3 side by side


def test_only_global_rank_0_checks_the_lock(tmp_path, monkeypatch):
    """Rank 0 of the run holds the lock from its start: the other processes (on any machine) do
    not take it for another run's."""
    from fastpref.train.arguments import ArgumentError, RunArguments
    from fastpref.train.output_dir import OutputDirLock, check_output_dir

    held = OutputDirLock(tmp_path / "out").acquire()
    try:
        monkeypatch.setenv("RANK", "1")
        check_output_dir(RunArguments(output_dir=str(tmp_path / "out")))
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(ArgumentError, match="in use by another run"):
            check_output_dir(RunArguments(output_dir=str(tmp_path / "out")))
    finally:
        held.release()


def test_a_folder_a_machine_does_not_see_is_named(tmp_path, monkeypatch):
    from fastpref.train.output_dir import SHARED_TOKEN, spans_machines, unseen

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / SHARED_TOKEN).write_text("token")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / SHARED_TOKEN).write_text("an older run's")
    assert unseen([tmp_path / "a", tmp_path / "b", tmp_path / "c"], "token") == [tmp_path / "b", tmp_path / "c"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not spans_machines()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert spans_machines()
