"""``fastpref train``'s arguments: every bad value stops the run before any work, with argparse's
usage line, a one-line message naming the flag and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from fastpref.train.config import TrainConfig  # noqa: E402


@pytest.mark.parametrize(
    "extra, needle",
    [
        # item 5: silent wrong results
        (["--resolution", "0"], "--resolution must be a positive multiple of 8"),
        (["--resolution", "36"], "--resolution must be a positive multiple of 8"),
        (["--max_train_steps", "0"], "--max_train_steps must be a positive int"),
        (["--checkpointing_steps", "-1"], "--checkpointing_steps must be an int >= 0"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be an int >= 1"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be an int >= 1"),
        # item 7: tracebacks
        (["--train_batch_size", "0"], "--train_batch_size must be an int >= 1"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive int"),
        (["--resolution", "7"], "--resolution must be a positive multiple of 8"),
        (["--ema_decays", "0.9,abc"], "argument --ema_decays/--ema-decays: ema_decays must be comma-separated numbers"),
        (["--flip_rate", "1.5"], "--flip_rate must be in [0, 1]"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be an int >= 1"),
        (["--report_to", "mlflow"], "--report_to must be one of"),
        (["--beta_dpo", "-1"], "--beta must be"),
        (["--loss_type", "dedpo"], "--human_fraction"),
        (["--resume_from_checkpoint", "checkpoint-99"], "--resume_from_checkpoint: checkpoint-99"),
    ],
)
def test_bad_values_stop_with_the_flag(train_main, tmp_path, extra, needle):
    code, err = train_main(tmp_path / "out", *extra)
    assert code == 2, err
    assert "usage: fastpref train" in err and "Traceback" not in err
    assert f"fastpref train: error: {needle}" in err, err
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_paths_are_checked_first_and_named(train_main, tmp_path, tiny_run):
    """A missing model is named before the dataset is read (the dataset is missing too here)."""
    code, err = train_main(
        tmp_path / "out", "--pretrained_model_name_or_path", tmp_path / "M2", "--dataset_name", tmp_path / "D2"
    )
    assert code == 2 and f"--pretrained_model_name_or_path: no such folder: {tmp_path / 'M2'}" in err
    assert "Hub" not in err and "Traceback" not in err
    code, err = train_main(tmp_path / "out", "--pretrained_model_name_or_path", "nobody/no-such-pipeline")
    assert code == 2 and "--pretrained_model_name_or_path: nobody/no-such-pipeline is no local folder" in err
    code, err = train_main(tmp_path / "out", "--pretrained_model_name_or_path", tiny_run["data"])
    assert code == 2 and "is not a diffusers pipeline folder" in err
    code, err = train_main(tmp_path / "out", "--dataset_name", tmp_path / "D2")
    assert code == 2 and f"--dataset_name: no such file or folder: {tmp_path / 'D2'}" in err


def test_output_dir_must_be_a_writable_folder(train_main, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, err = train_main(a_file)
    assert code == 2 and f"--output_dir: {a_file} is a file, not a folder" in err and "Traceback" not in err
    code, err = train_main(a_file / "out")
    assert code == 2 and f"--output_dir: {a_file} is a file, not a folder" in err
    assert not (tmp_path / "new").exists() and train_main(tmp_path / "new", "--resolution", 7)[0] == 2
    assert not (tmp_path / "new").exists()  # a bad command creates nothing


def test_output_dir_not_writable(train_main, tmp_path):
    import os

    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    elif os.path.isdir("/sys/fs"):
        out = "/sys/fastpref-test-out"  # root may write anywhere but in sysfs
    else:
        pytest.skip("no folder this user cannot write in")
    code, err = train_main(out)
    assert code == 2 and "--output_dir: cannot write in " in err and "Traceback" not in err


def test_backend_is_checked_at_start_up(train_main, tmp_path, monkeypatch):
    """Triton on CPU (without its interpreter) fails at start-up, not at the first step."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, err = train_main(tmp_path / "out", "--loss_backend", "triton", "--max_train_steps", "1")
    assert code == 2 and "--loss_backend triton cannot run on cpu" in err
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_a_batch_larger_than_the_data_stops(train_main, tmp_path):
    """1 usable pair and --train_batch_size 4 would repeat the pair in every batch."""
    code, err = train_main(tmp_path / "out", "--max_train_samples", "1", "--train_batch_size", "4")
    assert code == 2 and "--train_batch_size 4 x 1 process(es) is more than the 1 usable pairs" in err


def test_the_command_exits_2_without_a_traceback(tiny_run, tmp_path):
    """The real command (a subprocess): argparse's exit, before any model or data is read."""
    from offline import ROOT, tiny_args

    command = [sys.executable, "-m", "fastpref.cli", "train", *tiny_args(tiny_run, tmp_path / "o", "--resolution", 7)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "fastpref train: error: --resolution must be a positive multiple of 8 (the VAE's downsampling), got 7"
    )


def test_train_config_from_python_raises_value_error_naming_the_field():
    with pytest.raises(ValueError, match="max_train_steps"):
        TrainConfig(max_train_steps=0)
