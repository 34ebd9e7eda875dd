"""The step loop of a ``fastpref train`` run: train to ``max_train_steps``, logging each optimizer
step (``train_log.jsonl``, the trackers, the progress bar), checkpointing and validating on
schedule, and saving a checkpoint on a non-finite abort or an interrupt.

Interrupts (:class:`Interrupts`): SIGINT (Ctrl-C) and SIGTERM are deferred to the end of the
optimizer step in progress -- never between ``optimizer.step()`` and the step counters -- where the
run saves a checkpoint of that whole step and stops (:class:`Interrupted`). A second signal stops
the run at once, without a checkpoint (the last complete one stays the newest)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, List, Optional

import torch

from .checkpoints import save_checkpoint
from .output_dir import LOG_FILE
from .trainer import NonFiniteLossError, PreferenceTrainer
from .validation import samples_here

logger = logging.getLogger("fastpref.train")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal at a step boundary, after saving ``checkpoint`` (``None``
    when none could be saved); ``signum`` is the signal's number."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class Interrupts:
    """While active, the first SIGINT or SIGTERM is only recorded (:attr:`signum`), for the loop
    to act on at the next step boundary; a second raises ``KeyboardInterrupt`` at once. Handlers
    are installed from the main thread only (elsewhere Python cannot; signals keep their default)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signum = signum
        # os.write: a signal handler must not take the logging module's locks
        os.write(
            2,
            f"fastpref train: {signal.Signals(signum).name}: stopping at the end of this step, with a checkpoint "
            "(send it again to stop at once, without one)\n".encode(),
        )

    def requested(self, accelerator) -> Optional[int]:
        """The signal to stop on, agreed by every process (the largest number any one received)."""
        signum = self.signum or 0
        if accelerator.num_processes > 1:
            signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), reduction="max"))
        return signum or None


def window_logs(window: List[dict], trainer: PreferenceTrainer) -> dict:
    """Means over the micro-steps of one optimizer step."""
    logs = {}
    for key in ("loss", "implicit_acc", "u_mean", "weight_mean", "margin_mean", "u_flipped", "u_kept"):
        values = [w[key] for w in window if key in w]
        if values:
            logs[key] = sum(values) / len(values)
    logs["lr"] = window[-1]["lr"]
    logs["skipped_steps"] = trainer.skipped_steps
    return logs


def run_steps(
    trainer: PreferenceTrainer,
    batches,
    encode,
    run,
    run_id: str,
    accelerator,
    validate=None,
    interrupts: Optional[Interrupts] = None,
    checkpoint: Optional[Callable[[], Path]] = None,
) -> None:
    """Train until ``max_train_steps``: log each optimizer step (``train_log.jsonl``, trackers,
    progress bar), save a checkpoint every ``--checkpointing_steps`` (``checkpoint()``; default:
    :func:`~fastpref.train.checkpoints.save_checkpoint` of run ``run_id``) and call
    ``validate()`` (main process; every process under ``--fsdp``) every ``--validation_steps``. A
    non-finite abort saves a checkpoint and re-raises; a signal recorded by ``interrupts`` saves
    one at the end of its step and raises :class:`Interrupted`."""
    from tqdm.auto import tqdm

    config, output_dir = trainer.config, Path(run.output_dir)
    max_steps = config.max_train_steps
    saved_at = None
    if checkpoint is None:

        def checkpoint() -> Path:
            return save_checkpoint(accelerator, output_dir, trainer.global_step, run.checkpoints_total_limit, run_id)

    def save() -> Path:
        nonlocal saved_at
        saved_at = trainer.global_step
        return checkpoint()

    progress = tqdm(
        total=max_steps,
        initial=trainer.global_step,
        desc="steps",
        disable=run.no_progress or not accelerator.is_local_main_process,
    )
    window: List[dict] = []
    try:
        while trainer.global_step < max_steps:
            out = trainer.train_step(encode(next(batches)))
            window.append(out)
            if not out["stepped"]:
                continue
            logs = window_logs(window, trainer)
            window = []
            if accelerator.num_processes > 1 and not config.global_metric:  # the global batch's loss
                loss = torch.tensor(logs["loss"], device=accelerator.device)
                logs["loss"] = float(accelerator.reduce(loss, reduction="mean"))
            if accelerator.is_main_process:
                with open(output_dir / LOG_FILE, "a") as handle:
                    handle.write(json.dumps({"step": trainer.global_step, **logs}) + "\n")
            progress.update(1)
            progress.set_postfix(
                loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_acc']:.2f}" if "implicit_acc" in logs else "-"
            )
            accelerator.log(logs, step=trainer.global_step)
            step = trainer.global_step
            if run.checkpointing_steps and step % run.checkpointing_steps == 0 and step < max_steps:
                save()
            if validate is not None and step % run.validation_steps == 0 and samples_here(accelerator, trainer):
                validate()
            signum = interrupts.requested(accelerator) if interrupts is not None else None
            if signum is not None and step < max_steps:
                folder = checkpoint() if saved_at != step else output_dir / f"checkpoint-{step}"
                saved_at = step
                logger.warning("interrupted; saved %s (resume with --resume_from_checkpoint latest)", folder)
                raise Interrupted(signum, step, folder)
    except NonFiniteLossError:
        logger.error("aborted: non-finite loss; saved %s", save())
        accelerator.end_training()
        raise
    except KeyboardInterrupt:  # Interrupted (saved above), or a second signal: nothing more is saved
        accelerator.end_training()
        raise
    finally:
        progress.close()
