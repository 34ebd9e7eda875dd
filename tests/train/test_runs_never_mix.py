"""Runs never mix: the fault-injection matrix of ``fastpref train`` (start / resume x the states an
``--output_dir`` can be in), plus the checks that a resume, a flag or the disk can fail.

Every case of the matrix stops at start-up (in this process, before any model is loaded): what
the folder held must be there byte for byte afterwards. The runs that train are ``--output_dir .``
with ``--overwrite_output_dir``, the full disk at the final weights and SDXL's fp16 validation.
The interrupts inside a step, resumed bitwise, are in ``test_checkpoints.py`` (beside its
uninterrupted reference run).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
from importlib.util import find_spec
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from offline import tiny_args  # noqa: E402

from fastpref.train import checkpoints as ckpt  # noqa: E402
from fastpref.train import checks  # noqa: E402
from fastpref.train.arguments import build_parser, given_flags, parse_args  # noqa: E402
from fastpref.train.loop import Interrupts  # noqa: E402
from fastpref.train.output_dir import LOCK_FILE, OutputDirLock  # noqa: E402
from fastpref.train.run import resolve  # noqa: E402


class SaveState:
    """What ``save_checkpoint`` uses of an ``Accelerator``: ``save_state`` writes one file."""

    is_main_process = True

    def __init__(self, error=None):
        self.error = error

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "state.bin").write_bytes(b"state")
        if self.error is not None:
            raise self.error


def plan_of(tiny_run, out, *extra):
    parser = build_parser()
    argv = tiny_args(tiny_run, out, *extra)
    return resolve(*parse_args(argv, parser), given_flags(argv, parser))


def a_run(tiny_run, out, *extra, run_id="run-a", step=2, finished=True):
    """The files a run of the command ``extra`` leaves in ``out``: ``checkpoint-<step>`` whose
    manifest records its settings (as a real save does), its log, its summary and (finished) its
    weights. Returns ``out``."""
    plan = plan_of(tiny_run, out, *extra)
    settings = checks.recorded_settings(plan.data, plan.config, plan.run, 1)
    ckpt.save_checkpoint(SaveState(), out, step, None, run_id, settings)
    (out / "train_log.jsonl").write_text("".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in range(1, step + 1)))
    state = "finished" if finished else "running"
    (out / "train_summary.json").write_text(json.dumps({"run_id": run_id, "state": state}))
    if finished:
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights of " + run_id.encode())
    return out


def snapshot(folder):
    """Every file under ``folder`` with its bytes (the lock file aside: it may be created)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def unchanged(folder, before):
    after = snapshot(folder)
    after.pop(Path(LOCK_FILE), None)
    return after == before


# --------------------------------------------------------------------------------------------
# the matrix: (command, what --output_dir holds) -> exit 2 naming the cause, nothing touched
# --------------------------------------------------------------------------------------------


def locked_by_another_run(tiny_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    holder = open(out / LOCK_FILE, "a+")  # another open file: flock conflicts even in one process
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("fastpref train, pid 4242 on node-7, since 2026-01-01 00:00:00\n")
    holder.flush()
    return out, [], holder


def started_while_another_run_writes(tiny_run, tmp_path):
    out = a_run(tiny_run, tmp_path / "out", finished=False)
    _, _, holder = locked_by_another_run(tiny_run, tmp_path)
    return out, ["--overwrite_output_dir"], holder


def resumed_while_locked(tiny_run, tmp_path):
    out = a_run(tiny_run, tmp_path / "out", finished=False)
    _, _, holder = locked_by_another_run(tiny_run, tmp_path)
    return out, ["--resume_from_checkpoint", "latest"], holder


def a_pipeline_folder(tiny_run, tmp_path):
    out = tmp_path / "pipeline"
    shutil.copytree(tiny_run["model"], out)
    return out, [], None


def the_data_folder(tiny_run, tmp_path):
    return tiny_run["data"], [], None


def finished_without_checkpoints(tiny_run, tmp_path):
    out = a_run(tiny_run, tmp_path / "out")
    shutil.rmtree(out / "checkpoint-2")
    return out, ["--resume_from_checkpoint", "latest"], None


def third_run_and_a_foreign_checkpoint(tiny_run, tmp_path):
    other = a_run(tiny_run, tmp_path / "other", run_id="run-b")
    out = a_run(tiny_run, tmp_path / "out", run_id="run-c")
    return out, ["--resume_from_checkpoint", other / "checkpoint-2"], None


def a_checkpoint_of_another_run_copied_in(tiny_run, tmp_path):
    out = a_run(tiny_run, tmp_path / "out", run_id="run-c", step=1)
    other = a_run(tiny_run, tmp_path / "other", run_id="run-b")
    shutil.copytree(other / "checkpoint-2", out / "checkpoint-2")
    return out, ["--resume_from_checkpoint", "latest"], None


def the_model_folder(tiny_run, tmp_path):
    return tiny_run["model"], ["--overwrite_output_dir"], None


def changed_meaning(tiny_run, tmp_path):
    out = a_run(tiny_run, tmp_path / "out", finished=False)
    changed = ["--learning_rate", "2e-5", "--loss_type", "dpo", "--train_batch_size", "1", "--seed", "3"]
    return out, ["--resume_from_checkpoint", "latest", *changed, "--lora_rank", "2"], None


MATRIX = {
    # case: (setup, the words of the one-line error)
    "start-locked": (locked_by_another_run, ["is in use by another run (fastpref train, pid 4242 on node-7"]),
    "overwrite-locked": (started_while_another_run_writes, ["is in use by another run (fastpref train, pid 4242"]),
    "resume-locked": (resumed_while_locked, ["is in use by another run (fastpref train, pid 4242 on node-7"]),
    "start-in-a-pipeline-folder": (a_pipeline_folder, ["already holds a run (model_index.json, unet)"]),
    "start-in-the-data-folder": (the_data_folder, ["holds --dataset_name"]),
    "resume-latest-finished-no-checkpoint": (
        finished_without_checkpoints,
        ["--resume_from_checkpoint latest:", "holds a finished run (pytorch_lora_weights.safetensors)"],
    ),
    "resume-foreign-checkpoint-into-a-third-run": (
        third_run_and_a_foreign_checkpoint,
        ["is a checkpoint of the run in", "a resume continues a run in its own folder"],
    ),
    "resume-another-runs-checkpoint-in-the-folder": (
        a_checkpoint_of_another_run_copied_in,
        ["is of run run-b, but", "holds run run-c"],
    ),
    "overwrite-the-model-folder": (the_model_folder, ["holds --pretrained_model_name_or_path"]),
    "resume-with-other-settings": (
        changed_meaning,
        [
            "was trained with other settings: ",
            "--learning_rate 1e-05 (this command: 2e-05)",
            "--loss_type adaptive (this command: dpo)",
            "--train_batch_size x processes 2 (this command: 1)",
            "--seed 0 (this command: 3)",
            "--lora_rank 4 (this command: 2)",
        ],
    ),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_a_command_that_would_mix_runs_stops_at_start_up(train_main, tiny_run, tmp_path, case):
    setup, needles = MATRIX[case]
    out, extra, holder = setup(tiny_run, tmp_path)
    before = snapshot(out)
    before.pop(Path(LOCK_FILE), None)
    others = {p: snapshot(p) for p in tmp_path.iterdir() if p.is_dir() and p != out}
    code, err = train_main(out, *extra)
    if holder is not None:
        holder.close()
    lines = [line for line in err.splitlines() if line.startswith("fastpref train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert unchanged(out, before)
    assert all(snapshot(p) == files for p, files in others.items())


def test_the_lock_is_released_by_the_kernel_and_names_its_holder(tmp_path):
    """A second lock on a held folder fails naming the holder; once the holder's descriptor is
    closed (as when its process dies) the folder can be locked again."""
    first = OutputDirLock(tmp_path / "out").acquire()
    with pytest.raises(ValueError, match=rf"in use by another run \(fastpref train, pid {os.getpid()} on "):
        OutputDirLock(tmp_path / "out").acquire()
    first.release()
    OutputDirLock(tmp_path / "out").acquire().release()


def test_a_second_process_into_a_running_runs_folder_stops(train_main, tiny_run, tmp_path):
    """The report's case: two ``fastpref train`` processes into one folder. The second stops
    naming the first (its pid); once the first is killed, the folder is free again."""
    import subprocess
    import sys
    import time

    from offline import ROOT

    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastpref.cli", "train", *tiny_args(tiny_run, out, "--max_train_steps", 10**6)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text():
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.05)
        code, err = train_main(out, "--overwrite_output_dir")
        assert code == 2 and f"is in use by another run (fastpref train, pid {first.pid} on " in err, err[-2000:]
    finally:
        first.kill()
        first.wait()
    OutputDirLock(out).acquire().release()


def test_resume_applies_and_lists_the_changeable_settings(tiny_run, tmp_path):
    """Steps, checkpointing and logging may change on a resume (logged); nothing else is compared
    as changed."""
    out = a_run(tiny_run, tmp_path / "out", finished=False)
    plan = plan_of(tiny_run, out, "--resume_from_checkpoint", "latest", "--checkpointing_steps", 7)
    current = checks.recorded_settings(plan.data, plan.config, plan.run, 1)
    recorded = ckpt.read_manifest(out / "checkpoint-2")["settings"]
    assert checks.resume_differences(recorded, current) == ([], ["--checkpointing_steps 500 (this command: 7)"])
    assert "hub_token" not in recorded


def test_output_dir_dot_with_overwrite_writes_the_new_folder(train_main, tiny_run, tmp_path, monkeypatch):
    """``--output_dir . --overwrite_output_dir``: the old run is moved to ``../out.old-1`` and the
    new one is written to a new ``out`` (not into the moved folder); its summary says what ran."""
    out = a_run(tiny_run, tmp_path / "out")
    before = snapshot(out)
    monkeypatch.chdir(out)
    argv = tiny_args(tiny_run, ".", "--overwrite_output_dir", "--max_train_steps", 1, "--checkpointing_steps", 0)
    from fastpref.train.cli import main

    assert main(argv) == 0
    assert unchanged(tmp_path / "out.old-1", before)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["state"] == "finished" and summary["run_id"] != "run-a" and summary["global_step"] == 1
    assert (summary["seed"], summary["lora_rank"], summary["resolution"], summary["loss_type"]) == (
        0,
        4,
        32,
        "adaptive",
    )
    assert summary["learning_rate"] == 1e-5 and summary["data"]["dataset"] == str(tiny_run["data"])
    assert ckpt.read_manifest(out / "checkpoint-1")["run_id"] == summary["run_id"]


# --------------------------------------------------------------------------------------------
# every failure a user can cause: one line, exit 2, before the model loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lr_scheduler", "cosine_annealing"], "--lr_scheduler must be one of linear, cosine"),
        (["--adam_beta2", "1.5"], "--adam_beta2 must be in [0, 1), got 1.5"),
        (["--ema_decays", "0.9999,1.5"], "--ema_decays must each be in [0, 1), got 0.9999,1.5"),
        (["--ema_decays", "0.9999,1.0"], "--ema_decays must each be in [0, 1), got 0.9999,1.0"),
        (["--use_8bit_adam"], "--use_8bit_adam: bitsandbytes is not installed"),
        (["--cache_dir", "/proc/no-such-cache"], "--cache_dir: cannot write in /proc/no-such-cache"),
    ],
)
def test_flags_the_optimizer_would_refuse_stop_at_start_up(train_main, tmp_path, extra, needle):
    if "--use_8bit_adam" in extra and find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    code, err = train_main(tmp_path / "out", *extra)
    assert code == 2 and f"fastpref train: error: {needle}" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_full_disk_names_the_path(tmp_path, train_main, monkeypatch):
    """A save that fills the disk: its ``.partial`` folder is removed, the error names it; the
    command says so in one line, exit 2."""
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=r"no space left on the device while writing .*checkpoint-3\.partial"):
        ckpt.save_checkpoint(SaveState(full), tmp_path, 3, None, "run-a")
    torch_full = RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")
    torch_full = RuntimeError(f"{torch_full}: file write failed")
    with pytest.raises(OSError) as raised:
        ckpt.save_checkpoint(SaveState(torch_full), tmp_path, 3, None, "run-a")
    assert raised.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())

    from fastpref.train import cli

    def train(plan):
        raise raised.value

    monkeypatch.setattr(cli, "train", train)
    code, err = train_main(tmp_path / "out")
    assert code == 2 and "fastpref train: error: no space left on the device while writing" in err
    assert "Traceback" not in err


def test_a_signal_is_deferred_and_a_second_one_stops_at_once():
    with Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --------------------------------------------------------------------------------------------
# diffusers' default split
# --------------------------------------------------------------------------------------------


def test_a_data_set_with_only_a_validation_split_trains_on_it(tiny_run, tmp_path):
    """As diffusers' example data: no ``train`` split. With no --dataset_split_name the run takes
    ``validation`` and says so; a split named on the command line is kept (and refused)."""
    data = tmp_path / "data"
    (data / "data").mkdir(parents=True)
    for source in Path(tiny_run["data"]).glob("*.parquet"):
        shutil.copy(source, data / "data" / "validation-00000-of-00001.parquet")
    plan = plan_of(tiny_run, tmp_path / "out", "--dataset_name", data)
    assert plan.data.dataset_split_name == "validation"
    assert plan.notes == (
        f"--dataset_split_name not given and {data} has no split 'train': training on its 'validation' split "
        "(diffusers' default)",
    )
    from fastpref.train.data import PreferenceDataset

    assert len(PreferenceDataset(data, 32, split=plan.data.dataset_split_name, check_images=False)) > 0
    named = plan_of(tiny_run, tmp_path / "out", "--dataset_name", data, "--dataset_split_name", "train")
    assert named.data.dataset_split_name == "train" and named.notes == ()


def test_a_tracker_that_is_not_installed_stops_at_start_up(train_main, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code, err = train_main(tmp_path / "out", "--report_to", "tensorboard")
    assert code == 2 and "fastpref train: error: --report_to tensorboard: tensorboard is not installed" in err


def test_wandb_without_a_login_stops_at_start_up(train_main, tmp_path, monkeypatch):
    if find_spec("wandb") is None:
        pytest.skip("wandb is not installed here (that has its own message)")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    code, err = train_main(tmp_path / "out", "--report_to", "wandb")
    assert code == 2 and "fastpref train: error: --report_to wandb: no wandb login here" in err


def test_an_empty_parquet_file_is_named(train_main, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "label_0": pa.array([], pa.float64())}), data)
    code, err = train_main(tmp_path / "out", "--dataset_name", data)
    assert code == 2 and "Traceback" not in err
    assert f"fastpref train: error: --dataset_name: the 'train' parquet files hold no rows ({data})" in err


@pytest.mark.parametrize("how", ["decoded-at-fetch", "in-a-loader-worker", "latent-cache"])
def test_a_data_set_whose_images_all_fail_to_decode_is_named(train_main, tiny_run, tmp_path, how):
    """Every image undecodable: found at the first fetch (in this process or a DataLoader worker),
    or while building the latent cache; one line naming the data set and the rows skipped, exit 2."""
    import pyarrow.parquet as pq

    from fastpref.testing.toy_data import corrupt_rows, write_parquet

    columns = pq.read_table(next(Path(tiny_run["data"]).glob("*.parquet"))).to_pydict()
    rows = len(columns["jpg_0"])
    data = write_parquet(corrupt_rows(columns, range(rows)), tmp_path / "bad" / "train.parquet").parent
    cached = how == "latent-cache"
    extra = ["--cache_latents", "--latent_cache_dir", tmp_path / "cache"] if cached else []
    extra += ["--dataloader_num_workers", 1] if how == "in-a-loader-worker" else []
    code, err = train_main(tmp_path / "out", "--dataset_name", data, "--max_train_steps", 1, *extra)
    lines = [line for line in err.splitlines() if line.startswith("fastpref train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    if cached:
        needle = f"--dataset_name {data}: no usable pair: of its {rows} rows, 0 skipped as malformed, {rows} as "
        needle += "undecodable"
    else:
        needle = f"{data}: no pair decodes ({rows} rows skipped as undecodable"
    assert needle in lines[0], lines[0]


def torch_disk_full():
    """What ``torch.save`` raises on a full disk (its stream's error chained as the context)."""
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        except RuntimeError as error:
            return error


def safetensors_disk_full():
    """What safetensors' ``save_file`` raises on a full disk (not an OSError)."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_while_writing_the_final_weights_names_them(train_main, tmp_path, monkeypatch):
    """The weights file is torn: it is removed (the last checkpoint holds the weights) and named."""
    from fastpref.train import checkpoints

    out = tmp_path / "out"
    real = checkpoints.save_lora_weights

    def save_lora_weights(unet, family, folder):
        if Path(folder) != out:  # a checkpoint's copy
            return real(unet, family, folder)
        (out / checkpoints.WEIGHTS_FILE).write_bytes(b"torn")
        raise safetensors_disk_full()

    monkeypatch.setattr(checkpoints, "save_lora_weights", save_lora_weights)
    code, err = train_main(out, "--max_train_steps", 1, "--checkpointing_steps", 0)
    lines = [line for line in err.splitlines() if line.startswith("fastpref train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    weights = out / checkpoints.WEIGHTS_FILE
    assert lines[0] == f"fastpref train: error: no space left on the device while writing {weights}"
    assert not weights.exists() and (out / "checkpoint-1").is_dir()


def test_a_full_disk_while_writing_the_latent_cache_names_the_file(train_main, tmp_path, monkeypatch):
    """torch's and Python's forms of a full disk, in the cache's writer: one line naming the file
    being written; no temporary file is left."""
    import safetensors.torch

    def save_file(tensors, file):
        Path(file).write_bytes(b"torn")
        raise torch_disk_full()

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    cache = tmp_path / "cache"
    code, err = train_main(tmp_path / "out", "--cache_latents", "--latent_cache_dir", cache, "--max_train_steps", 1)
    lines = [line for line in err.splitlines() if line.startswith("fastpref train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"fastpref train: error: no space left on the device while writing {cache}")
    assert lines[0].endswith(".safetensors") and not [p for p in cache.rglob("*") if ".tmp" in p.name]


def test_an_atomic_write_on_a_full_disk_names_its_file(tmp_path):
    """Every form of a full disk (a full quota too) becomes ``OSError(ENOSPC)`` naming the file,
    no temporary file left; any other error passes unchanged."""
    from fastpref.files import write_atomic

    file = tmp_path / "train_summary.json"
    errors = [OSError(errno.EDQUOT, "Disk quota exceeded"), OSError(errno.ENOSPC, "No space left on device")]
    for error in [*errors, torch_disk_full(), safetensors_disk_full(), RuntimeError("not a disk")]:

        def write(tmp):
            tmp.write_bytes(b"torn")
            raise error

        with pytest.raises((OSError, RuntimeError)) as raised:
            write_atomic(file, write)
        if str(error) == "not a disk":
            assert raised.value is error
        else:
            assert raised.value.errno == errno.ENOSPC
            assert str(raised.value) == f"[Errno 28] no space left on the device while writing {file}"
        assert not list(tmp_path.iterdir())


def test_sdxl_validation_runs_under_fp16_mixed_precision(train_main, tiny_sdxl, tmp_path):
    """SDXL's VAE stays float32 under fp16 (it overflows in float16); the validation pipeline
    hands it the float16 latents of the denoiser, which it now decodes in its own dtype."""
    import numpy as np
    from accelerate.state import AcceleratorState
    from PIL import Image

    out = tmp_path / "out"
    extra = ["--pretrained_model_name_or_path", tiny_sdxl["model"], "--mixed_precision", "fp16", "--run_validation"]
    extra += ["--validation_prompts", "a red fox", "--validation_inference_steps", 1, "--max_train_steps", 1]
    # accelerate keeps one precision per process: this test's fp16 neither meets nor leaves another
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        code, err = train_main(out, *extra, "--checkpointing_steps", 0)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    image = np.asarray(Image.open(out / "validation" / "step-1" / "00.png"), dtype=np.float64)
    assert image.shape == (32, 32, 3) and image.std() > 0
