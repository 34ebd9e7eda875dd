"""What a finished ``fastpref train`` run writes besides its weights: ``train_summary.json``, the
model card (``README.md``) and, with ``--push_to_hub``, the upload of the folder."""

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


def run_summary(plan, trainer, inputs, seconds: float, processes: int) -> dict:
    """The summary of a finished run, as ``train_summary.json`` holds it."""
    config = trainer.config
    result = {
        "status": "finished",
        "arch": plan.family.name,
        "global_step": trainer.global_step,
        "skipped_steps": trainer.skipped_steps,
        "seconds": seconds,
        "data": inputs.summary,
        "loss_type": config.loss_type,
        "beta": config.beta,
        "k1": config.k1,
        "processes": processes,
    }
    if inputs.judge is not None:
        result["judge_agreement"] = inputs.judge
    return result


def write_outputs(plan, trainer, result: dict, images, repo_id) -> None:
    """``train_summary.json``, the model card with the last validation ``images``, and the
    upload to ``repo_id`` (``--push_to_hub``); main process only."""
    output_dir, run = plan.output_dir, plan.run
    write_text_atomic(output_dir / SUMMARY_FILE, json.dumps(result, indent=2) + "\n")
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
