"""The step loop of a ``fastpref train`` run: train to ``max_train_steps``, logging each optimizer
step (``train_log.jsonl``, the trackers, the progress bar), checkpointing and validating on
schedule, and saving a checkpoint on a non-finite abort or an interrupt."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List

import torch

from .checkpoints import save_checkpoint
from .output_dir import LOG_FILE
from .trainer import NonFiniteLossError, PreferenceTrainer

logger = logging.getLogger("fastpref.train")


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


def run_steps(trainer: PreferenceTrainer, batches, encode, run, run_id: str, accelerator, validate=None) -> None:
    """Train until ``max_train_steps``: log each optimizer step (``train_log.jsonl``, trackers,
    progress bar), checkpoint every ``--checkpointing_steps`` and call ``validate()`` (main
    process) every ``--validation_steps``. A non-finite abort saves a checkpoint and re-raises;
    so does an interrupt at a window boundary."""
    from tqdm.auto import tqdm

    config, output_dir = trainer.config, Path(run.output_dir)
    max_steps = config.max_train_steps

    def checkpoint() -> Path:
        return save_checkpoint(accelerator, output_dir, trainer.global_step, run.checkpoints_total_limit, run_id)

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
                checkpoint()
            if validate is not None and step % run.validation_steps == 0 and accelerator.is_main_process:
                validate()
    except NonFiniteLossError:
        logger.error("aborted: non-finite loss; saved %s", checkpoint())
        accelerator.end_training()
        raise
    except KeyboardInterrupt:
        if trainer.micro_step % config.gradient_accumulation_steps == 0:
            logger.warning("interrupted; saved %s (resume with --resume_from_checkpoint latest)", checkpoint())
        accelerator.end_training()
        raise
    finally:
        progress.close()
