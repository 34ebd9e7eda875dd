"""One ``fastpref train`` run: :func:`resolve` checks the command and resolves what it names
once, at start-up (the model source, its family, the resolution, the :class:`TrainConfig`) into
a :class:`RunPlan`; :func:`train` runs the plan."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Set

import torch

from . import checks, hub
from .arguments import DataArguments, RunArguments, defaults_that_differ
from .assembly import build_trainer, load_data, make_accelerator, make_loader, run_config
from .checkpoints import new_run_id, resume, save_checkpoint, save_weights
from .config import TrainConfig
from .families import ModelFamily
from .loop import run_steps
from .models import ModelSource
from .output_dir import LOG_FILE, check_output_dir, move_aside
from .sharding import check_fsdp
from .summary import run_summary, write_outputs
from .validation import run_validation

logger = logging.getLogger("fastpref.train")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A checked command, resolved once: the three argument groups as parsed (``settings``: the
    TrainConfig fields, ``None`` for the run defaults not given), the flags the command line set
    (``given``; ``None``: unknown), the model ``source`` and its ``family``, the training
    ``resolution`` and the :class:`TrainConfig` (checked; the values only the run knows are set
    by :func:`~fastpref.train.assembly.run_config`)."""

    data: DataArguments
    settings: dict
    run: RunArguments
    given: Optional[Set[str]]
    source: ModelSource
    family: ModelFamily
    resolution: int
    config: TrainConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


def resolve(data_args: DataArguments, settings: dict, run: RunArguments, given: Optional[Set[str]] = None) -> RunPlan:
    """Check every argument before any heavy import or data read -- the paths first (with the
    path in the message), then the values -- and resolve the model's source and family (its
    configs read once: a Hub id is asked once), the resolution and the :class:`TrainConfig`.
    :class:`~fastpref.train.arguments.ArgumentError` names the flag and what it allows."""
    source = ModelSource.of(data_args)
    family = checks.check_model(source)
    checks.check_dataset_path(data_args.dataset_name)
    check_output_dir(run)
    checks.check_data_values(data_args, settings["loss_type"])
    checks.check_run_values(run)
    config = checks.check_train_settings(settings, family)
    checks.check_family_options(config, family, source)
    check_fsdp(config, run)
    checks.check_installed(run)
    checks.check_hub(run)
    resolution = data_args.resolution if data_args.resolution is not None else family.defaults.resolution
    return RunPlan(data_args, dict(settings), run, given, source, family, resolution, config)


def train(plan: RunPlan) -> dict:
    """Run a :class:`RunPlan`; returns the summary written to ``train_summary.json``.

    Opens the preference pairs with ``datasets`` (:class:`~fastpref.train.data.PreferenceDataset`:
    winner first, ties dropped unless ``--keep_ties``, seeded ``--flip_rate`` flips, bad rows
    skipped and counted), optionally encodes them once into the latent cache, and runs a
    :class:`~fastpref.train.trainer.PreferenceTrainer` for ``max_train_steps`` optimizer steps.
    Outputs in ``--output_dir``:

    - ``pytorch_lora_weights.safetensors`` (LoRA; ``pipe.load_lora_weights(output_dir)``) or the
      family's denoiser folder, ``unet/`` for SD (full fine-tune, safetensors);
    - ``checkpoint-N/`` every ``--checkpointing_steps`` steps and at the end (accelerate state
      plus the trainer's counters and EMA footprints; saved whole or not at all);
      ``--resume_from_checkpoint latest`` continues bit for bit (the data order and the noise
      are functions of the step);
    - ``logs/`` (TensorBoard with ``--report_to tensorboard``), ``train_log.jsonl`` (one line per
      optimizer step: loss, implicit accuracy, mean u, W, Gamma, u on flipped vs kept pairs, LR,
      skipped steps) and ``train_summary.json``;
    - ``validation/step-N/*.png`` with ``--run_validation`` (also logged to the trackers);
    - ``README.md``, the model card; with ``--push_to_hub`` the folder is uploaded at the end.
    """
    from accelerate.utils import set_seed

    run, output_dir = plan.run, plan.output_dir
    accelerator = make_accelerator(run, plan.settings["mixed_precision"])
    log_differences(plan)
    allow_tf32(run.allow_tf32)
    checks.check_backend(plan.config.loss_backend, accelerator.device)
    set_seed(plan.config.seed)
    repo_id = None
    if accelerator.is_main_process:
        if run.overwrite_output_dir and not run.resume_from_checkpoint:
            move_aside(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if run.push_to_hub:
            repo_id = hub.create_repository(run.hub_model_id, output_dir, run.hub_token)
    accelerator.wait_for_everyone()

    inputs = load_data(plan, accelerator)
    checks.check_batch_fits(run.train_batch_size, accelerator.num_processes, inputs.summary, plan.data.dataset_name)
    config = run_config(plan, len(inputs.dataset), accelerator)
    trainer = build_trainer(plan, config, accelerator)
    resumed = resume(accelerator, trainer, run.resume_from_checkpoint, output_dir, output_dir / LOG_FILE)
    run_id = resumed["run_id"] if resumed else new_run_id()
    if accelerator.is_main_process and run.report_to != "none":
        name = run.tracker_name or plan.family.defaults.tracker_name
        accelerator.init_trackers(name, config=hparams(plan.data, plan.settings, run))

    validated = {}  # step -> the validation images of that step

    def validate():
        validated[trainer.global_step] = run_validation(trainer, plan.source, run, plan.resolution, output_dir)

    loader = make_loader(inputs.dataset, run.train_batch_size, plan.data.dataloader_num_workers, trainer, accelerator)
    started = time.perf_counter()
    run_steps(trainer, iter(loader), inputs.encode, run, run_id, accelerator, validate if run.run_validation else None)

    save_checkpoint(accelerator, output_dir, trainer.global_step, run.checkpoints_total_limit, run_id)
    save_weights(accelerator, trainer, output_dir)
    if run.run_validation and accelerator.is_main_process and trainer.global_step not in validated:
        validate()  # the final weights
    result = run_summary(plan, trainer, inputs, time.perf_counter() - started, accelerator.num_processes)
    if accelerator.is_main_process:
        write_outputs(plan, trainer, result, validated.get(trainer.global_step, []), repo_id)
    accelerator.end_training()
    return result


def log_differences(plan: RunPlan) -> None:
    """The run's first log lines: where it departs from what diffusers' DPO scripts would do with
    the same command."""
    values = {**vars(plan.data), **plan.settings, **vars(plan.run)}
    for line in defaults_that_differ(values, plan.family, plan.given):
        logger.warning("default differs from diffusers' script: %s", line)
    note = plan.family.beta_note(plan.settings["beta"]) if plan.settings["beta"] is not None else None
    if note is not None:
        logger.warning(note)
    if plan.run.prior_generation_precision is not None:
        logger.warning("--prior_generation_precision: unused (diffusers' DPO scripts do not use it either)")


def allow_tf32(allow: bool) -> None:
    """``--allow_tf32``: CUDA matmuls and cuDNN convolutions may use TF32 (Ampere and later)."""
    if allow:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        logger.info("--allow_tf32: TF32 matmuls and cuDNN convolutions allowed")


def hparams(*groups) -> dict:
    """The run's settings as tracker hyper-parameters (scalars and strings only)."""
    values = {}
    for group in groups:
        values.update(group if isinstance(group, dict) else dataclasses.asdict(group))
    values = {k: str(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
