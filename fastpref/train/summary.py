"""What a ``fastpref train`` run writes besides its weights: ``train_summary.json`` (written when
the run starts, at every checkpoint and when it ends: never stale), the model card (``README.md``)
and, with ``--push_to_hub``, the upload of the folder."""

from __future__ import annotations

import json

from ..files import write_text_atomic
from . import hub
from .config import TrainConfig
from .model_card import write_model_card
from .output_dir import SUMMARY_FILE


def card_settings(config: TrainConfig, run, resolution: int, processes: int, dataset: str) -> dict:
    """The hyper-parameters the model card lists."""
    names = ("loss_type", "beta", "lora_rank", "learning_rate", "lr_scheduler", "lr_warmup_steps")
    names += ("gradient_accumulation_steps", "max_train_steps", "mixed_precision", "seed", "is_turbo")
    values = {name: getattr(config, name) for name in names}
    if config.uses_footprints:  # the metric u's settings
        values.update(
            k1=config.k1,
            rho=config.rho,
            weighting=config.resolved_weighting,
            margin=config.resolved_margin,
            ema_decays=",".join(map(str, config.ema_decays)),
        )
    values.update(dataset=dataset, resolution=resolution, train_batch_size=run.train_batch_size, processes=processes)
    return values


# train_summary.json's "state": "running" while the run holds its folder (a summary that says
# "running" in a folder no process has locked is a run that was killed), "finished", "interrupted"
# (a signal: it saved a checkpoint and stopped) or "aborted" (non-finite losses).
STATES = ("running", "finished", "interrupted", "aborted")


def run_summary(plan, trainer, inputs, seconds: float, processes: int, run_id: str, state: str) -> dict:
    """The summary of the run as it stands, as ``train_summary.json`` holds it: what a reader
    needs to know what the folder holds (the run id, the state, the step; the objective and its
    options, the learning rate, the rank, the seed, the resolution, the batch geometry, the data)."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    config = trainer.config
    result = {
        "run_id": run_id,
        "state": state,
        "status": state,
        "arch": plan.family.name,
        "model": plan.source.path,
        "global_step": trainer.global_step,
        "max_train_steps": config.max_train_steps,
        "skipped_steps": trainer.skipped_steps,
        "seconds": seconds,
        "data": {"dataset": plan.data.dataset_name, **inputs.summary},
        "loss_type": config.loss_type,
        "beta": config.beta,
        "k1": config.k1,
        "rho": config.rho,
        "weighting": config.resolved_weighting,
        "margin": config.resolved_margin,
        "ema_decays": list(config.ema_decays) if config.uses_footprints else [],
        "seed": config.seed,
        "learning_rate": config.learning_rate,
        "lr_scheduler": config.lr_scheduler,
        "lora_rank": config.lora_rank,
        "resolution": plan.resolution,
        "train_batch_size": plan.run.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "mixed_precision": config.mixed_precision,
        "processes": processes,
    }
    if inputs.judge is not None:
        result["judge_agreement"] = inputs.judge
    return result


def write_summary(output_dir, result: dict) -> None:
    """``train_summary.json``, atomically."""
    write_text_atomic(output_dir / SUMMARY_FILE, json.dumps(result, indent=2) + "\n")


def write_outputs(plan, trainer, result: dict, images, repo_id) -> None:
    """``train_summary.json``, the model card with the last validation ``images``, and the
    upload to ``repo_id`` (``--push_to_hub``); main process only."""
    output_dir, run = plan.output_dir, plan.run
    write_summary(output_dir, result)
    settings = card_settings(trainer.config, run, plan.resolution, result["processes"], plan.data.dataset_name)
    write_model_card(
        output_dir,
        plan.source.path,
        plan.family,
        trainer.config.loss_type,
        settings,
        run.validation_prompts,
        images,
        lora=trainer.config.lora_rank > 0,
    )
    if repo_id is not None:
        hub.push(repo_id, output_dir, run.hub_token)
