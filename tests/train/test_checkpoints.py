"""Checkpoints survive crashes: whatever kills a save, the newest complete checkpoint is intact,
and resuming ``latest`` falls back to the previous one when the newest does not validate.

The save sequence (``fastpref.train.checkpoints.SAVE_POINTS``) is cut at every point: in this
process with a stand-in accelerator (fast, both a new step and a re-saved one), and in the real
``fastpref train`` killed by its ``FASTPREF_FAULT`` hook, then resumed with ``latest``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from fastpref.train import checkpoints as ckpt  # noqa: E402

STATE_FILE = "state.bin"


class Killed(Exception):
    """Stands for the SIGKILL of the test hook."""


class FakeAccelerator:
    """What ``save_checkpoint`` uses of ``accelerate.Accelerator``; ``save_state`` writes
    ``state.bin`` holding ``self.content``."""

    is_main_process = True
    content = b""

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        from pathlib import Path

        Path(folder).mkdir(parents=True)
        (Path(folder) / STATE_FILE).write_bytes(self.content)


def save(out, step, content, limit=None, run_id="run-a"):
    accelerator = FakeAccelerator()
    accelerator.content = content
    return ckpt.save_checkpoint(accelerator, out, step, limit, run_id)


def newest_after_recovery(out):
    """``(step, content)`` of what ``latest`` resumes; every ``checkpoint-N`` must be complete."""
    ckpt.recover(out)
    folders = ckpt.checkpoints(out)
    for folder in folders:
        ckpt.validate(folder)
    assert not [p.name for p in out.iterdir() if p.name.endswith((".partial", ".old", ".deleting"))]
    return ckpt.step_of(folders[-1]), (folders[-1] / STATE_FILE).read_bytes()


# (point, re-save?): every point of a re-save; a new step's save has no "aside"
CUTS = [(point, resave) for resave in (False, True) for point in ckpt.SAVE_POINTS if resave or point != "aside"]


@pytest.mark.parametrize("point, resave", CUTS, ids=[f"{p}-{'re-save' if r else 'new-step'}" for p, r in CUTS])
def test_a_save_cut_at_any_point_keeps_the_newest_checkpoint(tmp_path, monkeypatch, point, resave):
    """Before the rename, ``latest`` is the previous checkpoint (or the old copy of a re-saved
    step); from the rename on, the new one; nothing half-written ever carries a checkpoint's name."""
    out = tmp_path / "out"
    out.mkdir()
    save(out, 1, b"one", limit=1)
    if resave:
        save(out, 2, b"two-old", limit=None)
    reached = []

    def fault(name, step):
        reached.append(name)
        if name == point:
            raise Killed

    monkeypatch.setattr(ckpt, "fault", fault)
    with pytest.raises(Killed):
        save(out, 2, b"two-new", limit=1)
    assert reached[-1] == point
    done = ckpt.SAVE_POINTS.index(point) >= ckpt.SAVE_POINTS.index("renamed")
    expected = (2, b"two-new") if done else (2, b"two-old") if resave else (1, b"one")
    assert newest_after_recovery(out) == expected


def test_every_save_point_is_reached_by_a_re_save(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    save(out, 1, b"one")
    save(out, 2, b"two")
    reached = []
    monkeypatch.setattr(ckpt, "fault", lambda name, step: reached.append(name))
    save(out, 2, b"two again", limit=1)
    assert tuple(reached) == ckpt.SAVE_POINTS


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    """Item 2: a foreign checkpoint (another run's id, or no manifest) is never deleted."""
    out = tmp_path / "out"
    out.mkdir()
    save(out, 6, b"foreign", run_id="run-b")
    (out / "checkpoint-7").mkdir()  # not a fastpref checkpoint at all
    for step in (1, 2, 3):
        save(out, step, b"ours", limit=1)
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]
    save(out, 8, b"ours", limit=2)
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-7", "checkpoint-8"]


def test_rotation_never_deletes_the_checkpoint_just_saved(tmp_path):
    """Resumed from an older checkpoint, the new one is kept even where a later one exists."""
    out = tmp_path / "out"
    out.mkdir()
    for step in (4, 8):
        save(out, step, b"ours")
    save(out, 5, b"ours again", limit=1)
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-5"]


def test_validate_names_the_truncated_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    folder = save(out, 1, b"0123456789")
    (folder / STATE_FILE).write_bytes(b"01234")
    with pytest.raises(ckpt.CheckpointError, match=r"state\.bin: 5 bytes, 10 when saved"):
        ckpt.validate(folder)
    (folder / STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"state\.bin: missing"):
        ckpt.validate(folder)


def test_truncate_log_drops_later_and_torn_lines(tmp_path):
    """Item 4: a torn last line no longer blocks a resume; the log is cut to the step."""
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    ckpt.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    ckpt.truncate_log(log, 0)
    assert log.read_text() == ""


# --------------------------------------------------------------------------------------------
# the real command, killed by its test hook
# --------------------------------------------------------------------------------------------

RUN = ["--max_train_steps", 3, "--checkpointing_steps", 1]
LIMITED = [*RUN, "--checkpoints_total_limit", 1]
VOLATILE = {"random_states_0.pkl", ckpt.MANIFEST}  # the RNG file also holds unused generators' states


def same_checkpoint(a, b):
    names = {p.name for p in a.iterdir()} - VOLATILE
    assert names == {p.name for p in b.iterdir()} - VOLATILE
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def same_weights(a, b):
    from safetensors.torch import load_file

    x, y = load_file(a / "pytorch_lora_weights.safetensors"), load_file(b / "pytorch_lora_weights.safetensors")
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def log_of(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_run):
    """One uninterrupted 3-step run, a checkpoint at every step (all kept)."""
    import os
    import subprocess
    import sys

    from offline import ROOT, tiny_args

    out = tmp_path_factory.mktemp("reference") / "out"
    command = [sys.executable, "-m", "fastpref.cli", "train", *tiny_args(tiny_run, out, *RUN)]
    env = {k: v for k, v in os.environ.items() if k != ckpt.FAULT_ENV}
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env, timeout=600)
    return out


def test_kill_at_every_save_point_then_resume_latest_is_bitwise(reference, train_subprocess, tmp_path):
    """Item 3. The run is killed at each point of the save of step 2 (``checkpoint-1`` about to
    be rotated away): ``latest`` is then a complete checkpoint equal to the uninterrupted run's.
    The run killed after it re-saves step 2 (the old ``checkpoint-2`` renamed aside, the new one
    not yet in place) resumes ``latest`` to the end with bitwise the same weights and log."""
    for point in ckpt.SAVE_POINTS:
        if point == "aside":
            continue  # only a re-save moves a folder aside: below
        out = tmp_path / point
        result = train_subprocess(out, *LIMITED, fault=f"{point}:2", check=False)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-2000:])
        if point == "saved":
            shutil.copytree(out, tmp_path / "resave")
        step, _ = newest_after_recovery_real(out)
        assert step == (2 if ckpt.SAVE_POINTS.index(point) >= ckpt.SAVE_POINTS.index("renamed") else 1), point
        assert same_checkpoint(out / f"checkpoint-{step}", reference / f"checkpoint-{step}"), point

    out = tmp_path / "resave"  # step 2 saved, then killed: resume it to step 2, killed in the re-save
    resave = [*LIMITED[:1], 2, *LIMITED[2:], "--resume_from_checkpoint", "latest"]
    result = train_subprocess(out, *resave, fault="aside:2", check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-2.old").is_dir()
    result = train_subprocess(out, *LIMITED, "--resume_from_checkpoint", "latest")
    assert "restored" in result.stderr and "resumed from" in result.stderr
    assert same_weights(out, reference)
    assert log_of(out) == log_of(reference)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]


def newest_after_recovery_real(out):
    ckpt.recover(out)
    folders = ckpt.checkpoints(out)
    for folder in folders:
        ckpt.validate(folder)
    assert not list(out.glob("checkpoint-*.*"))
    return ckpt.step_of(folders[-1]), folders[-1]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(reference, train_subprocess, tmp_path):
    """Item 7 and 4: the newest checkpoint has a damaged file (its size kept: only the checksum
    tells) and the log a torn last line; ``latest`` warns naming the file, resumes from the
    previous checkpoint and ends bitwise as the uninterrupted run, with its log."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "pytorch_lora_weights.safetensors").unlink()  # not finished yet: killed in its last save
    torn = out / "checkpoint-3" / "optimizer.bin"
    data = bytearray(torn.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    torn.write_bytes(bytes(data))
    with open(out / "train_log.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 0.69')
    result = train_subprocess(out, *RUN, "--resume_from_checkpoint", "latest")
    assert f"{torn}: its sha256 differs" in result.stderr and "trying the previous one" in result.stderr
    assert "resumed from" in result.stderr and "checkpoint-2 at step 2" in result.stderr
    assert same_weights(out, reference)
    assert log_of(out) == log_of(reference)
    assert same_checkpoint(out / "checkpoint-3", reference / "checkpoint-3")


def test_validate_names_the_damaged_file(tmp_path):
    """Item 3 of issue 20: same size, other bytes."""
    out = tmp_path / "out"
    out.mkdir()
    folder = save(out, 1, b"0123456789")
    (folder / STATE_FILE).write_bytes(b"0123456780")
    with pytest.raises(ckpt.CheckpointError, match=r"state\.bin: its sha256 differs from the one saved"):
        ckpt.validate(folder)


@pytest.mark.parametrize("point", ["before-optimizer-step", "after-optimizer-step"])
def test_an_interrupt_inside_a_step_saves_that_whole_step(reference, tiny_run, tmp_path, monkeypatch, caplog, point):
    """Ctrl-C inside step 2 -- before ``optimizer.step()``, or after it and before the step
    counters -- stops the run at the end of step 2 with a checkpoint of it (exit 130): the
    uninterrupted run's ``checkpoint-2``, and resumed, its weights and log."""
    import torch
    from offline import tiny_args

    from fastpref.train.cli import main

    out = tmp_path / "out"
    original, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(point)
        if len(calls) == 2 and point == "before-optimizer-step":
            os.kill(os.getpid(), signal.SIGINT)
        result = original(self, *args, **kwargs)
        if len(calls) == 2 and point == "after-optimizer-step":
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    try:
        code = main(tiny_args(tiny_run, out, *RUN[:2], "--checkpointing_steps", 0))
    except BaseException as error:  # noqa: BLE001 -- before deferral: KeyboardInterrupt mid-step
        code = repr(error)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert code == 128 + signal.SIGINT
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-2"]
    assert same_checkpoint(out / "checkpoint-2", reference / "checkpoint-2")
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["state"], summary["global_step"]) == ("interrupted", 2)
    assert main(tiny_args(tiny_run, out, *RUN, "--resume_from_checkpoint", "latest")) == 0
    assert same_weights(out, reference) and log_of(out) == log_of(reference)
    assert "resume: changed --checkpointing_steps 0 (this command: 1)" in caplog.text
    assert json.loads((out / "train_summary.json").read_text())["state"] == "finished"


def test_an_interrupt_inside_an_accumulation_window_saves_whole_steps(tiny_run, tmp_path, monkeypatch):
    """``--gradient_accumulation_steps 2``: Ctrl-C in the backward pass of the first micro-batch
    stops the run once step 1's window is complete, with the uninterrupted run's ``checkpoint-1``
    (never a half-accumulated gradient); resumed, its weights and log."""
    from accelerate import Accelerator
    from offline import tiny_args

    from fastpref.train.cli import main

    steps = ["--max_train_steps", 2, "--gradient_accumulation_steps", 2]
    reference = tmp_path / "reference"
    assert main(tiny_args(tiny_run, reference, *steps, "--checkpointing_steps", 1)) == 0

    out = tmp_path / "out"
    original, calls = Accelerator.backward, []

    def backward(self, loss, **kwargs):
        calls.append(loss)
        if len(calls) == 1:  # micro-batch 1 of 4: the window of step 1 has begun
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", backward)
    code = main(tiny_args(tiny_run, out, *steps, "--checkpointing_steps", 0))
    monkeypatch.setattr(Accelerator, "backward", original)
    assert code == 128 + signal.SIGINT and len(calls) == 2
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-1"]
    assert same_checkpoint(out / "checkpoint-1", reference / "checkpoint-1")
    assert main(tiny_args(tiny_run, out, *steps, "--checkpointing_steps", 1, "--resume_from_checkpoint", "latest")) == 0
    assert same_weights(out, reference) and log_of(out) == log_of(reference)
