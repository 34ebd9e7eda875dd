"""One ``fastpref train`` run: :func:`resolve` checks the command and resolves what it names
once, at start-up (the model source, its family, the resolution, the :class:`TrainConfig`) into
a :class:`RunPlan`; :func:`train` runs the plan."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Optional, Set, Tuple

import torch

from . import checks, hub
from .arguments import DataArguments, RunArguments, defaults_that_differ
from .assembly import build_trainer, load_data, make_accelerator, make_loader, run_config, stream_batches
from .checkpoints import new_run_id, resume, save_checkpoint, save_weights
from .config import TrainConfig
from .data.sources import default_split
from .families import ModelFamily
from .loop import Interrupts, run_steps
from .models import ModelSource
from .output_dir import LOG_FILE, check_output_dir, check_shared_folders, claim, is_global_main, newest_manifest
from .sharding import check_fsdp
from .summary import run_summary, write_outputs, write_summary
from .trainer import NonFiniteLossError
from .validation import load_scorer, run_validation, samples_here

logger = logging.getLogger("fastpref.train")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A checked command, resolved once: the three argument groups as parsed (``settings``: the
    TrainConfig fields, ``None`` for the run defaults not given), the flags the command line set
    (``given``; ``None``: unknown), the model ``source`` and its ``family``, the training
    ``resolution`` and the :class:`TrainConfig` (checked; the values only the run knows are set
    by :func:`~fastpref.train.assembly.run_config`); ``notes``: the choices made for the user,
    logged when the run starts."""

    data: DataArguments
    settings: dict
    run: RunArguments
    given: Optional[Set[str]]
    source: ModelSource
    family: ModelFamily
    resolution: int
    config: TrainConfig
    notes: Tuple[str, ...] = ()

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


def resolve(data_args: DataArguments, settings: dict, run: RunArguments, given: Optional[Set[str]] = None) -> RunPlan:
    """Check every argument before any heavy import or data read -- the paths first (with the
    path in the message), then the values -- and resolve the model's source and family (its
    configs read once: a Hub id is asked once), the resolution and the :class:`TrainConfig`.
    :class:`~fastpref.train.arguments.ArgumentError` names the flag and what it allows."""
    # absolute: "--output_dir ." names the same folder after --overwrite_output_dir moved it aside
    run = dataclasses.replace(run, output_dir=os.path.abspath(Path(run.output_dir).expanduser()))
    source = ModelSource.of(data_args)
    family = checks.check_model(source)
    checks.check_dataset_path(data_args.dataset_name)
    notes = []
    if given is not None and "dataset_split_name" not in given:
        split = default_split(data_args.dataset_name, data_args.dataset_split_name, data_args.cache_dir)
        if split != data_args.dataset_split_name:
            notes.append(
                f"--dataset_split_name not given and {data_args.dataset_name} has no split "
                f"{data_args.dataset_split_name!r}: training on its {split!r} split (diffusers' default)"
            )
            data_args = dataclasses.replace(data_args, dataset_split_name=split)
    inputs = {"--pretrained_model_name_or_path": source.path, "--dataset_name": data_args.dataset_name}
    check_output_dir(run, inputs)
    checks.check_data_values(data_args, settings["loss_type"])
    notes += checks.check_streaming(data_args, settings, given)
    checks.check_run_values(run)
    config = checks.check_train_settings(settings, family)
    checks.check_optimizer_values(config)
    checks.check_family_options(config, family, source)
    family = family.configured(config)  # the family's run settings (the flow flags)
    check_fsdp(config, run)
    checks.check_installed(run)
    checks.check_validation_scorer(run)
    checks.check_optimizer_installed(config)
    checks.check_writable(data_args)
    checks.check_hub(run)
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # what accelerate launch will start
    manifest = newest_manifest(Path(run.output_dir), run.resume_from_checkpoint)
    current = checks.recorded_settings(data_args, config, run, processes)
    checks.check_resume_settings(manifest and manifest.get("settings"), current, run.resume_from_checkpoint)
    resolution = data_args.resolution if data_args.resolution is not None else family.defaults.resolution
    checks.check_resolution(resolution, family)
    return RunPlan(data_args, dict(settings), run, given, source, family, resolution, config, tuple(notes))


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
      skipped steps) and ``train_summary.json`` (written at the start, at every checkpoint and
      at the end; its ``state``: running, finished, interrupted or aborted);
    - ``validation/step-N/*.png`` with ``--run_validation`` (also logged to the trackers);
    - ``README.md``, the model card; with ``--push_to_hub`` the folder is uploaded at the end.

    The process of global rank 0 holds the folder's lock (:func:`~fastpref.train.output_dir.claim`)
    from start to end. SIGINT / SIGTERM stop the run at the end of the step in progress, with a
    checkpoint (:class:`~fastpref.train.loop.Interrupted`).
    """
    # One process (global rank 0) owns the folder for the whole run; the kernel drops the lock
    # when the process ends, however it ends.
    lock = claim(plan.run) if is_global_main() else None
    try:
        return _train(plan)
    finally:
        if lock is not None:
            lock.release()


def _train(plan: RunPlan) -> dict:
    from accelerate.utils import set_seed

    run, output_dir = plan.run, plan.output_dir
    accelerator = make_accelerator(run, plan.settings["mixed_precision"])
    log_differences(plan)
    recorded = checks.recorded_settings(plan.data, plan.config, run, accelerator.num_processes)
    changes = check_resume(plan, newest_manifest(output_dir, run.resume_from_checkpoint), recorded)
    allow_tf32(run.allow_tf32)
    checks.check_backend(plan.config.loss_backend, accelerator.device)
    set_seed(plan.config.seed)
    repo_id = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if run.push_to_hub:
            repo_id = hub.create_repository(run.hub_model_id, output_dir, run.hub_token)
    accelerator.wait_for_everyone()
    # several machines: one file system for the run's folders (README, "Several machines")
    check_shared_folders(accelerator, [output_dir] + ([plan.data.latent_cache_dir] if plan.data.cache_latents else []))

    inputs = load_data(plan, accelerator)
    num_pairs = None if plan.data.streaming else len(inputs.dataset)  # a stream has no length
    if num_pairs is not None:
        checks.check_batch_fits(run.train_batch_size, accelerator.num_processes, inputs.summary, plan.data.dataset_name)
    config = run_config(plan, num_pairs, accelerator)
    trainer = build_trainer(plan, config, accelerator, num_pairs=num_pairs)
    resumed = resume(accelerator, trainer, run.resume_from_checkpoint, output_dir, output_dir / LOG_FILE)
    if resumed is not None:  # the checkpoint loaded may be an older one than the one checked first
        changes = check_resume(plan, resumed, recorded)
    for line in changes:
        logger.warning("resume: changed %s", line)
    run_id = resumed["run_id"] if resumed else new_run_id()
    if accelerator.is_main_process and run.report_to != "none":
        name = run.tracker_name or plan.family.defaults.tracker_name
        accelerator.init_trackers(name, config=hparams(plan.data, plan.settings, run))

    scorer = load_scorer(run, accelerator.device, trainer.weight_dtype) if accelerator.is_main_process else None
    validated = {}  # step -> the validation images of that step
    started = time.perf_counter()

    def summary(state: str) -> dict:
        seconds = time.perf_counter() - started
        result = run_summary(plan, trainer, inputs, seconds, accelerator.num_processes, run_id, state)
        if accelerator.is_main_process and state != "finished":
            write_summary(output_dir, result)
        return result

    def validate():
        validated[trainer.global_step] = run_validation(trainer, plan.source, run, plan.resolution, output_dir, scorer)

    def checkpoint() -> Path:
        folder = save_checkpoint(
            accelerator, output_dir, trainer.global_step, run.checkpoints_total_limit, run_id, recorded
        )
        summary("running")
        return folder

    summary("running")
    if plan.data.streaming:
        loader = stream_batches(inputs.dataset, inputs.summary, trainer)
    else:
        workers = plan.data.dataloader_num_workers
        loader = make_loader(inputs.dataset, run.train_batch_size, workers, trainer, accelerator)
    with Interrupts() as interrupts:
        try:
            run_steps(
                trainer,
                iter(loader),
                inputs.encode,
                run,
                run_id,
                accelerator,
                validate if run.run_validation else None,
                interrupts,
                checkpoint,
            )
        except KeyboardInterrupt:  # Interrupted (a checkpoint saved), or a second signal (none)
            summary("interrupted")
            raise
        except NonFiniteLossError:
            summary("aborted")
            raise
        checkpoint()
        save_weights(accelerator, trainer, output_dir)
        if run.run_validation and samples_here(accelerator, trainer) and trainer.global_step not in validated:
            validate()  # the final weights
        result = summary("finished")
        if accelerator.is_main_process:
            write_outputs(plan, trainer, result, validated.get(trainer.global_step, []), repo_id)
    accelerator.end_training()
    return result


def check_resume(plan: RunPlan, manifest: Optional[dict], recorded: dict) -> list:
    """The resumed checkpoint's recorded settings against this run's
    (:func:`~fastpref.train.checks.check_resume_settings`); the changed lines to log."""
    if manifest is None:
        return []
    checkpoint = plan.run.resume_from_checkpoint
    return checks.check_resume_settings(manifest.get("settings"), recorded, checkpoint)


def log_differences(plan: RunPlan) -> None:
    """The run's first log lines: where it departs from what diffusers' DPO scripts would do with
    the same command."""
    values = {**vars(plan.data), **plan.settings, **vars(plan.run)}
    for line in defaults_that_differ(values, plan.family, plan.given):
        logger.warning("default differs from diffusers' script: %s", line)
    for note in plan.notes:
        logger.warning(note)
    config, family = plan.config, plan.family
    given = "" if plan.settings["beta"] is None else "given, "
    logger.info(
        "model family %s (%s): beta %g (%sthe family's default %g), learning rate %g",
        family.name,
        family.title,
        config.beta,
        given,
        family.defaults.beta,
        config.learning_rate,
    )
    if family.settings_note() is not None:
        logger.info(family.settings_note())
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
