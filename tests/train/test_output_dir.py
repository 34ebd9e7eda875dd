"""A fresh run never mixes with what an ``--output_dir`` already holds: it stops with a message,
or moves the old contents aside with ``--overwrite_output_dir``."""

from __future__ import annotations

import json
import signal

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def another_run(out):
    """What another run left in ``out``: its checkpoint-6 and its log."""
    (out / "checkpoint-6").mkdir(parents=True)
    (out / "checkpoint-6" / "optimizer.bin").write_bytes(b"theirs")
    (out / "train_log.jsonl").write_text('{"step": 6, "loss": 0.5}\n')


def test_a_fresh_run_into_a_used_output_dir_stops(train_main, tmp_path):
    out = tmp_path / "out"
    another_run(out)
    code, err = train_main(out, "--checkpoints_total_limit", 1)
    assert code == 2 and "Traceback" not in err
    assert f"fastpref train: error: --output_dir: {out} already holds a run (checkpoint-6, train_log.jsonl)" in err
    assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir" in err
    assert (out / "checkpoint-6" / "optimizer.bin").read_bytes() == b"theirs"
    assert steps_logged(out) == [6]
    code, err = train_main(out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest")
    assert code == 2 and "--overwrite_output_dir: cannot be combined with --resume_from_checkpoint latest" in err


def test_overwrite_output_dir_moves_the_old_run_aside(train_subprocess, tmp_path):
    out = tmp_path / "out"
    another_run(out)
    result = train_subprocess(
        out,
        "--max_train_steps",
        2,
        "--checkpointing_steps",
        1,
        "--checkpoints_total_limit",
        1,
        "--overwrite_output_dir",
    )
    assert "moved the previous contents" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".fastpref.lock",
        "README.md",
        "checkpoint-2",
        "pytorch_lora_weights.safetensors",
        "train_log.jsonl",
        "train_summary.json",
    ]
    assert steps_logged(out) == [1, 2]
    old = tmp_path / "out.old-1"
    assert (old / "checkpoint-6" / "optimizer.bin").read_bytes() == b"theirs" and steps_logged(old) == [6]


def test_a_run_killed_before_its_first_checkpoint(train_subprocess, train_main, tmp_path):
    """Its log lines and half-written checkpoint stop a fresh run; resuming ``latest`` starts
    over with an empty log (not steps 1, 2, 1, 2, 3)."""
    out = tmp_path / "out"
    args = ["--max_train_steps", 2, "--checkpointing_steps", 1]
    result = train_subprocess(out, *args, fault="written:1", check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert steps_logged(out) == [1] and (out / "checkpoint-1.partial").is_dir()
    code, err = train_main(out, *args)
    assert code == 2 and "already holds a run (checkpoint-1.partial, train_log.jsonl, train_summary.json)" in err
    result = train_subprocess(out, *args, "--resume_from_checkpoint", "latest")
    assert "no checkpoint" in result.stderr
    assert steps_logged(out) == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
