"""The rules of ``--output_dir``: what a run leaves there (:data:`RUN_FILES`), when a new run may
start in it (:func:`check_output_dir`), the lock that makes one run its only writer
(:class:`OutputDirLock`, :func:`claim`), and ``--overwrite_output_dir``'s move aside
(:func:`move_aside`)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from ..files import replace_durably
from .arguments import ArgumentError, RunArguments
from .checkpoints import CHECKPOINT, WEIGHTS_FILE, CheckpointError, checkpoints, read_manifest, resolve_resume
from .families import FAMILIES

logger = logging.getLogger("fastpref.train")

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
LOCK_FILE = ".fastpref.lock"
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline's folder: never a fresh run's output
# What a run leaves in its --output_dir (a full fine-tune: its family's denoiser folder): a fresh
# run stops rather than mix with them.
RUN_FILES = (
    "checkpoint-*",
    WEIGHTS_FILE,
    *sorted({f.denoiser_folder for f in FAMILIES.values()}),
    LOG_FILE,
    SUMMARY_FILE,
    PIPELINE_INDEX,
)
# What a finished run leaves (beside its checkpoints): ``latest`` with no checkpoint never starts
# over a folder holding one of them.
FINISHED_FILES = (WEIGHTS_FILE, *sorted({f.denoiser_folder for f in FAMILIES.values()}), PIPELINE_INDEX)


def check_output_dir(run: RunArguments, inputs: Optional[dict] = None) -> None:
    """``--output_dir`` is a folder this process can write in, or can be made in one (nothing is
    created here), apart from the run's ``inputs`` (``{flag: path}``: the model, the data); then
    :func:`check_use`."""
    output_dir = Path(run.output_dir)
    existing = next(p for p in (output_dir, *Path(os.path.abspath(output_dir)).parents) if p.exists())
    if not existing.is_dir():
        raise ArgumentError(f"--output_dir: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ArgumentError(f"--output_dir: cannot write in {existing} ({error.strerror or error})") from None
    out = Path(os.path.abspath(output_dir))
    for flag, value in (inputs or {}).items():
        path = Path(os.path.abspath(Path(str(value)).expanduser()))
        if value and path.exists() and (path == out or (run.overwrite_output_dir and out in path.parents)):
            raise ArgumentError(
                f"--output_dir: {output_dir} holds {flag} {value}; a run writes (and --overwrite_output_dir "
                "moves) its output folder: choose another --output_dir"
            )
    if is_global_main():  # the holder-to-be: the other processes would find it holding the lock
        OutputDirLock(output_dir).check_free()  # a held folder: name the holder, not what it wrote so far
    check_use(run)


def is_global_main() -> bool:
    """Whether this process is the run's global rank 0 (``$RANK``, as ``torchrun`` / ``accelerate
    launch`` set it on every machine; unset: one process): the one that holds the lock."""
    return os.environ.get("RANK", "0") == "0"


def check_use(run: RunArguments) -> None:
    """Whether this command may write in ``--output_dir`` as it stands: a fresh run needs it unused
    (or ``--overwrite_output_dir``); ``--resume_from_checkpoint`` names a checkpoint of the run
    that ``--output_dir`` holds (``latest`` with none yet: only where no finished run is)."""
    output_dir = Path(run.output_dir)
    if run.resume_from_checkpoint:
        check_resume_target(run, output_dir)
        return
    used = used_by_a_run(output_dir)
    if used and not run.overwrite_output_dir:
        raise ArgumentError(
            f"--output_dir: {output_dir} already holds a run ({', '.join(used)}); continue it with "
            "--resume_from_checkpoint latest, or start a new run there with --overwrite_output_dir "
            "(moves the old contents aside)"
        )


def check_resume_target(run: RunArguments, output_dir: Path) -> None:
    """``--resume_from_checkpoint`` continues the run of ``--output_dir`` only: the checkpoint is
    in that folder and of the run its summary names; ``latest`` with no checkpoint starts the run
    over only where no finished run is (its weights or a pipeline)."""
    value = run.resume_from_checkpoint
    if run.overwrite_output_dir and value == "latest":
        raise ArgumentError("--overwrite_output_dir: cannot be combined with --resume_from_checkpoint latest")
    try:
        path = resolve_resume(value, output_dir)
    except FileNotFoundError as error:
        raise ArgumentError(str(error)) from None
    if path is None:
        finished = sorted({p.name for name in FINISHED_FILES for p in output_dir.glob(name)})
        if finished and not list(output_dir.glob("checkpoint-*.old")):  # a .old: a re-save to restore
            raise ArgumentError(
                f"--resume_from_checkpoint latest: {output_dir} holds a finished run ({', '.join(finished)}) "
                "and no checkpoint to continue it from; start a new run in another --output_dir, or there "
                "with --overwrite_output_dir (moves the old contents aside)"
            )
        return
    home = Path(os.path.abspath(path)).parent
    if home != Path(os.path.abspath(output_dir)):
        raise ArgumentError(
            f"--resume_from_checkpoint: {path} is a checkpoint of the run in {home}, not of --output_dir "
            f"{output_dir}; a resume continues a run in its own folder: pass --output_dir {home}"
        )
    ours, theirs = folder_run_id(output_dir), checkpoint_run_id(path)
    if ours is not None and theirs is not None and ours != theirs:
        raise ArgumentError(
            f"--resume_from_checkpoint: {path} is of run {theirs}, but {output_dir} holds run {ours} "
            f"({SUMMARY_FILE}); it is not this folder's run to continue"
        )


def folder_run_id(output_dir: Path) -> Optional[str]:
    """The run id that ``train_summary.json`` names (``None``: no summary, or one without an id)."""
    try:
        return json.loads((output_dir / SUMMARY_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_run_id(folder: Path) -> Optional[str]:
    try:
        return read_manifest(folder).get("run_id")
    except CheckpointError:
        return None


def newest_manifest(output_dir: Path, value: Optional[str]) -> Optional[dict]:
    """The manifest of the checkpoint ``--resume_from_checkpoint value`` would resume first
    (``latest``: the newest with a readable manifest, a ``.old`` that a resume restores
    included); ``None`` when there is none."""
    if not value:
        return None
    if value != "latest":
        candidates = [resolve_resume(value, output_dir)]
    else:
        found = checkpoints(output_dir) + [
            p for p in output_dir.glob("checkpoint-*.old") if CHECKPOINT.match(p.name[: -len(".old")])
        ]
        candidates = sorted(found, key=lambda p: int(p.name.split("-")[1].split(".")[0]), reverse=True)
    for folder in candidates:
        try:
            return read_manifest(folder)
        except CheckpointError:
            continue
    return None


def used_by_a_run(output_dir: Path) -> List[str]:
    """The names in ``output_dir`` that a run (or a pipeline) wrote (:data:`RUN_FILES`), sorted."""
    return sorted({path.name for pattern in RUN_FILES for path in output_dir.glob(pattern)})


class OutputDirLock:
    """The lock that makes one process the only writer of a run's folder: ``fcntl.flock`` on
    ``OUTPUT_DIR/.fastpref.lock``, which holds the holder's pid, host and start time. The kernel
    drops the lock when the process ends, however it ends: a killed run never leaves it stuck.
    The file itself stays (removing it would let two processes lock two files)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.handle = None

    def acquire(self) -> "OutputDirLock":
        """Create the folder if needed and take the lock; :class:`ArgumentError` naming the holder
        when another process has it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = self._lock(open(self.folder / LOCK_FILE, "a+"))
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"fastpref train, pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        self.handle = handle
        return self

    def check_free(self) -> None:
        """:class:`ArgumentError` naming the holder if another process holds the lock now;
        nothing is created or written."""
        try:
            handle = open(self.folder / LOCK_FILE)
        except OSError:
            return  # no lock file: no run has held the folder
        self._lock(handle).close()

    def _lock(self, handle):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ArgumentError(f"--output_dir: cannot lock {self.folder / LOCK_FILE} ({error})") from None
            raise ArgumentError(
                f"--output_dir: {self.folder} is in use by another run ({holder}); wait for it to end or "
                "choose another --output_dir"
            ) from None
        return handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the last descriptor drops the flock
            self.handle = None


def claim(run: RunArguments) -> OutputDirLock:
    """Take ``--output_dir`` for this run: lock it (:class:`OutputDirLock`), check its use again
    under the lock (:func:`check_use`: another run may have written there since the start-up
    checks), and with ``--overwrite_output_dir`` move the old contents aside
    (:func:`move_aside`) and lock the new, empty folder. Returns the held lock."""
    output_dir = Path(run.output_dir)
    lock = OutputDirLock(output_dir).acquire()
    try:
        check_use(run)
        if run.overwrite_output_dir and not run.resume_from_checkpoint and move_aside(output_dir) is not None:
            fresh = OutputDirLock(output_dir).acquire()
            lock.release()
            lock = fresh
    except BaseException:
        lock.release()
        raise
    return lock


def move_aside(output_dir: Path) -> Optional[Path]:
    """``--overwrite_output_dir``: rename a used ``output_dir`` to ``<output_dir>.old-N`` (the
    first N free), so the two runs never mix. Returns the new name."""
    if not used_by_a_run(output_dir):
        return None
    output_dir = Path(os.path.abspath(output_dir))  # "." has no name to add a suffix to
    number = 1
    while output_dir.with_name(f"{output_dir.name}.old-{number}").exists():
        number += 1
    aside = output_dir.with_name(f"{output_dir.name}.old-{number}")
    replace_durably(output_dir, aside)
    logger.warning("--overwrite_output_dir: moved the previous contents of %s to %s", output_dir, aside)
    return aside


# -- runs that span machines ----------------------------------------------------------------------

SHARED_TOKEN = ".fastpref.shared"


def spans_machines() -> bool:
    """Whether the run's processes are on more than one machine (``accelerate launch
    --num_machines N``: ``$LOCAL_WORLD_SIZE`` < ``$WORLD_SIZE``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world


def unseen(folders, token: str) -> List[Path]:
    """The folders of ``folders`` whose :data:`SHARED_TOKEN` file does not hold ``token``."""
    missing = []
    for folder in folders:
        try:
            if (Path(folder) / SHARED_TOKEN).read_text() == token:
                continue
        except OSError:
            pass
        missing.append(Path(folder))
    return missing


def check_shared_folders(accelerator, folders) -> None:
    """A run on several machines assumes one file system that all of them see at ``folders``
    (``--output_dir``, and the latent cache): global rank 0 alone writes the lock, the
    checkpoints' common files, the summaries and the trackers' logs, and the processes write
    their own shards (checkpoints, latent cache) side by side. Global rank 0 writes a token
    file in each folder, every process reads it back (retried for 10 s: NFS caches directory
    entries for a few seconds) and all agree; ``ValueError`` naming the folders a machine does
    not see. Nothing is checked on one machine."""
    import uuid

    import torch.distributed as dist

    if not spans_machines():
        return
    folders = [Path(f) for f in folders]
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    dist.broadcast_object_list(token)
    if accelerator.is_main_process:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SHARED_TOKEN).write_text(token[0])
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + 10
    while (missing := unseen(folders, token[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    failures = [None] * accelerator.num_processes
    dist.all_gather_object(failures, [str(f) for f in missing])
    if accelerator.is_main_process:
        for folder in folders:
            (folder / SHARED_TOKEN).unlink(missing_ok=True)
    named = sorted({f for rank in failures for f in rank})
    if named:
        ranks = [rank for rank, f in enumerate(failures) if f]
        raise ValueError(
            f"{', '.join(named)}: not seen by the process(es) of global rank {ranks}: a run on several machines "
            "needs --output_dir (and --latent_cache_dir with --cache_latents) on a file system every machine "
            "shares (NFS, Lustre, a cloud file store)"
        )
