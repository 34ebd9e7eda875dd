"""``fastpref train``'s argument checks, run once before any heavy import or data read: each
raises :class:`~fastpref.train.arguments.ArgumentError` whose message names the flag and what it
allows (:func:`fastpref.train.run.resolve` calls them in order: paths first, then values)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import fastpref

from . import hub
from .arguments import ArgumentError, DataArguments, RunArguments
from .config import TrainConfig
from .families import FAMILIES, ModelFamily
from .models import MODEL_INDEX, ModelSource

REPORT_TO = ("tensorboard", "wandb", "all", "none")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(source: ModelSource) -> ModelFamily:
    """``--pretrained_model_name_or_path`` is a local diffusers pipeline folder, or an ``org/name``
    Hub id the Hub (or its cache) serves, of a family fastpref trains; returns the family. The
    pipeline's configs are read here, once (:attr:`ModelSource.configs`)."""
    value = source.path
    path = Path(value).expanduser()
    if path.is_dir():
        denoisers = {family.denoiser_folder for family in FAMILIES.values()}
        if not (path / MODEL_INDEX).is_file() and not any((path / folder).is_dir() for folder in denoisers):
            raise ArgumentError(
                f"--pretrained_model_name_or_path: {value} is not a diffusers pipeline folder "
                f"(no {MODEL_INDEX} or denoiser folder)"
            )
    elif path.exists():
        raise ArgumentError(f"--pretrained_model_name_or_path: {value} is a file, not a pipeline folder")
    elif not HUB_ID.match(value):
        raise ArgumentError(f"--pretrained_model_name_or_path: no such folder: {value}")
    try:
        source.configs
    except Exception as error:  # a Hub id offline, unknown, gated, ...: all mean "not usable here"
        if source.is_local and isinstance(error, (OSError, ValueError)):
            raise ArgumentError(f"--pretrained_model_name_or_path: {error}") from None
        raise ArgumentError(
            f"--pretrained_model_name_or_path: {value} is no local folder, and the Hub does not serve it here "
            f"({type(error).__name__})"
        ) from None
    try:
        return source.family
    except ValueError as error:
        raise ArgumentError(f"--pretrained_model_name_or_path: {error}") from None


def check_dataset_path(value: str) -> None:
    """A local file or folder (read later by :func:`~fastpref.train.data.open_split`), or what
    looks like a Hub id (``org/name``; ``datasets.load_dataset`` says later whether it loads)."""
    if not Path(value).expanduser().exists() and not HUB_ID.match(value):
        raise ArgumentError(f"--dataset_name: no such file or folder: {value} (and not a Hub id, org/name)")


def check_data_values(data_args: DataArguments, loss_type: str) -> None:
    """The values of :class:`DataArguments` (the dataset's own checks, named by flag)."""
    resolution = data_args.resolution
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise ArgumentError(f"--resolution must be a positive multiple of 8 (the VAE's downsampling), got {resolution}")
    if data_args.max_train_samples is not None and data_args.max_train_samples < 1:
        raise ArgumentError(f"--max_train_samples must be >= 1 (or not given: all), got {data_args.max_train_samples}")
    if not 0.0 <= data_args.flip_rate <= 1.0:
        raise ArgumentError(f"--flip_rate must be in [0, 1], got {data_args.flip_rate}")
    if data_args.dataloader_num_workers < 0:
        raise ArgumentError(f"--dataloader_num_workers must be >= 0, got {data_args.dataloader_num_workers}")
    if data_args.vae_encode_batch_size < 1:
        raise ArgumentError(f"--vae_encode_batch_size must be >= 1, got {data_args.vae_encode_batch_size}")
    if data_args.random_crop and data_args.cache_latents:
        raise ArgumentError(
            "--random_crop: cannot be combined with --cache_latents (each image is encoded once, centre-cropped); "
            "drop one of them"
        )
    for name in ("caption_column", "image_column_0", "image_column_1", "label_column", "dataset_split_name"):
        if not getattr(data_args, name):
            raise ArgumentError(f"--{name} must not be empty")
    if loss_type == "dedpo" and data_args.human_fraction is None:
        raise ArgumentError(
            "--human_fraction: --loss_type dedpo needs it (the share of pairs that keep a human label, in (0, 1])"
        )
    if data_args.human_fraction is not None and not 0.0 < data_args.human_fraction <= 1.0:
        raise ArgumentError(f"--human_fraction must be in (0, 1], got {data_args.human_fraction}")


def check_run_values(run: RunArguments) -> None:
    """The values of :class:`RunArguments` other than the paths."""
    for name, least in (("train_batch_size", 1), ("num_train_epochs", 1), ("checkpointing_steps", 0)):
        value = getattr(run, name)
        if value < least:
            raise ArgumentError(f"--{name} must be an int >= {least}, got {value}")
    if run.checkpoints_total_limit is not None and run.checkpoints_total_limit < 1:
        raise ArgumentError(
            f"--checkpoints_total_limit must be an int >= 1 (or not given: keep all), got {run.checkpoints_total_limit}"
        )
    if run.report_to not in REPORT_TO:
        raise ArgumentError(f"--report_to must be one of {', '.join(REPORT_TO)}, got {run.report_to!r}")
    if run.validation_steps < 1:
        raise ArgumentError(f"--validation_steps must be an int >= 1, got {run.validation_steps}")
    if run.validation_inference_steps is not None and run.validation_inference_steps < 1:
        raise ArgumentError(
            f"--validation_inference_steps must be an int >= 1 (or not given), got {run.validation_inference_steps}"
        )
    if run.run_validation and not run.validation_prompts:
        raise ArgumentError("--validation_prompts: --run_validation needs at least one prompt")
    if run.hub_token is not None and run.report_to == "wandb":  # diffusers' rule
        raise ArgumentError(
            "--hub_token: cannot be combined with --report_to wandb, which would record the token in its run "
            "config; log in with `hf auth login` instead"
        )


def check_installed(run: RunArguments) -> None:
    """The optional packages the flags need: xformers, wandb (found, not imported)."""
    from importlib.util import find_spec

    if run.enable_xformers_memory_efficient_attention and find_spec("xformers") is None:
        raise ArgumentError(
            "--enable_xformers_memory_efficient_attention: xformers is not installed; install the build that "
            "matches your torch and CUDA (pip install 'fastpref[xformers]'), or drop the flag"
        )
    if run.report_to == "wandb" and find_spec("wandb") is None:
        raise ArgumentError("--report_to wandb: wandb is not installed (pip install wandb)")


def check_train_settings(settings: dict, family: ModelFamily) -> TrainConfig:
    """The :class:`TrainConfig` of the fields as given, through its own checks (the loss's among
    them: the one check of the loss's keywords before the first loss call), ``beta`` and ``k1``
    left unset taken from ``family``; the other :data:`RUN_DEFAULTS` not given stand in with valid
    values until :meth:`TrainConfig.for_run` sets them."""
    stand_ins = {"beta": family.defaults.beta, "k1": family.defaults.k1, "max_train_steps": 1, "mixed_precision": "no"}
    values = {name: stand_ins.get(name) if value is None else value for name, value in settings.items()}
    try:
        return TrainConfig(**values)
    except (ValueError, TypeError) as error:
        raise ArgumentError(flagged(str(error))) from None


def check_family_options(config: TrainConfig, family: ModelFamily, source: ModelSource) -> None:
    """The options that only some families take (``--is_turbo``, the flow-matching flags)."""
    if config.is_turbo and not family.has_turbo:
        raise ArgumentError(f"--is_turbo: {source.path} holds {family.description}; SDXL Turbo is an SDXL model")
    flow = config.flow_options_given
    if flow and not family.takes_flow_options:
        raise ArgumentError(f"--{flow[0]}: a flow-matching flag (sd3, flux); {source.path} holds {family.description}")


def check_resolution(resolution: int, family: ModelFamily) -> None:
    """The training resolution suits the family (FLUX packs 2x2 latents: a multiple of 16)."""
    if resolution % family.resolution_multiple:
        raise ArgumentError(
            f"--resolution must be a multiple of {family.resolution_multiple} for {family.title}, got {resolution}"
        )


def check_hub(run: RunArguments) -> None:
    """``--push_to_hub``: the Hub and the token work now, not after training."""
    if run.push_to_hub:
        try:
            hub.check_hub(run.hub_token)
        except hub.HubError as error:
            raise ArgumentError(f"--push_to_hub: {error}") from None


def flagged(message: str) -> str:
    """A :class:`TrainConfig` message (it starts with the field's name) with the flag's name."""
    for field_ in sorted(dataclasses.fields(TrainConfig), key=lambda f: -len(f.name)):
        if message.startswith(field_.name):
            return "--" + message
    return message


def check_backend(backend: str, device) -> None:
    """``--loss_backend`` can serve tensors on ``device`` (not only at the first step)."""
    if backend == "auto":
        return
    reason = fastpref.availability(device)[backend]
    if reason is not None:
        raise ArgumentError(f"--loss_backend {backend} cannot run on {device}: {reason}")


def check_batch_fits(batch_size: int, processes: int, summary: dict, dataset_name: str) -> None:
    """A global batch holds distinct pairs: fewer usable pairs than it would repeat some in every batch."""
    if batch_size * processes > summary["pairs"]:
        raise ArgumentError(
            f"--train_batch_size {batch_size} x {processes} process(es) is more than the {summary['pairs']} usable "
            f"pairs in {dataset_name}: every batch would repeat pairs; lower --train_batch_size"
        )
