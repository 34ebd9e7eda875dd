"""``fastpref train``'s argument checks, run once before any heavy import or data read: each
raises :class:`~fastpref.train.arguments.ArgumentError` whose message names the flag and what it
allows (:func:`fastpref.train.run.resolve` calls them in order: paths first, then values)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import List, Optional

import fastpref

from . import hub
from .arguments import ArgumentError, DataArguments, RunArguments
from .config import TrainConfig
from .families import FAMILIES, ModelFamily
from .footprints import check_decays
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
    if run.report_to in ("wandb", "all") and find_spec("wandb") is None:
        raise ArgumentError(f"--report_to {run.report_to}: wandb is not installed (pip install wandb)")
    if run.report_to in ("wandb", "all") and not wandb_logged_in():
        raise ArgumentError(
            f"--report_to {run.report_to}: no wandb login here (run `wandb login`, set WANDB_API_KEY, or "
            "WANDB_MODE=offline)"
        )
    if run.report_to in ("tensorboard", "all") and find_spec("tensorboard") is None:
        raise ArgumentError(
            f"--report_to {run.report_to}: tensorboard is not installed (pip install tensorboard); "
            "or pass --report_to none"
        )


def check_validation_scorer(run: RunArguments) -> None:
    """``--validation_scorer``: a known scorer with its package installed, asked with
    ``--run_validation``; ``--scorer_weights`` well formed (nothing is loaded here)."""
    from fastpref.scorers import MissingExtraError, scorer_class
    from fastpref.scorers.flags import parse_weights

    try:
        parse_weights(run.scorer_weights)
        if run.validation_scorer is not None:
            scorer_class(run.validation_scorer, "--validation_scorer").check_installed()
    except MissingExtraError as error:
        raise ArgumentError(f"--validation_scorer: {error}") from None
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    if run.validation_scorer is not None and not run.run_validation:
        raise ArgumentError("--validation_scorer: scores the validation images; add --run_validation")


def wandb_logged_in() -> bool:
    """Whether wandb can log here without asking: ``WANDB_API_KEY``, an offline or disabled
    ``WANDB_MODE``, or the ``api.wandb.ai`` entry that ``wandb login`` writes to ``~/.netrc``."""
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return base in hosts


def check_optimizer_installed(config: TrainConfig) -> None:
    """``--use_8bit_adam`` needs bitsandbytes (found, not imported)."""
    from importlib.util import find_spec

    if config.use_8bit_adam and find_spec("bitsandbytes") is None:
        raise ArgumentError(
            "--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes; it needs a CUDA GPU), "
            "or drop the flag"
        )


def check_optimizer_values(config: TrainConfig) -> None:
    """The values the optimizer, the LR schedule and the EMA footprints would otherwise refuse only
    after the model has loaded: the schedule's name, Adam's betas, epsilon and weight decay, the
    decays, the clipping norm."""
    from diffusers.optimization import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if config.lr_scheduler not in names:
        raise ArgumentError(f"--lr_scheduler must be one of {', '.join(names)}, got {config.lr_scheduler!r}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ArgumentError(f"--{name} must be in [0, 1), got {getattr(config, name)}")
    for name in ("adam_epsilon", "adam_weight_decay", "max_grad_norm"):
        if not getattr(config, name) >= 0.0:
            raise ArgumentError(f"--{name} must be >= 0, got {getattr(config, name)}")
    if config.uses_footprints:
        try:
            check_decays(config.ema_decays)  # the footprints' own rule, here before the model loads
        except ValueError:
            raise ArgumentError(
                f"--ema_decays must each be in [0, 1), got {','.join(map(str, config.ema_decays))}"
            ) from None


def check_writable(data_args: DataArguments) -> None:
    """The folders the run writes besides ``--output_dir``: ``--cache_dir`` and, with
    ``--cache_latents``, ``--latent_cache_dir`` (made where missing, as the run would)."""
    import datasets.config

    folders = [("cache_dir", data_args.cache_dir or str(datasets.config.HF_DATASETS_CACHE))]
    if data_args.cache_latents:
        folders.append(("latent_cache_dir", data_args.latent_cache_dir))
    for flag, value in folders:
        if value is None:
            continue
        folder = Path(value).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ArgumentError(f"--{flag}: cannot write in {value} ({error.strerror or error})") from None


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
    """A global batch holds distinct pairs: fewer usable pairs than it would repeat some in every batch.
    No usable pair at all is named as such, with the rows skipped and why."""
    if summary["pairs"] == 0:
        raise ArgumentError(
            f"--dataset_name {dataset_name}: no usable pair: of its {summary['rows']} rows, {summary['malformed']} "
            f"skipped as malformed, {summary['undecodable']} as undecodable, {summary['ties_dropped']} ties dropped"
        )
    if batch_size * processes > summary["pairs"]:
        raise ArgumentError(
            f"--train_batch_size {batch_size} x {processes} process(es) is more than the {summary['pairs']} usable "
            f"pairs in {dataset_name}: every batch would repeat pairs; lower --train_batch_size"
        )


# --------------------------------------------------------------------------------------------
# a resume: the command against the checkpoint's settings
# --------------------------------------------------------------------------------------------

# The settings a resume may change: applied and logged. Every other recorded setting (the
# objective and its options, the data and its split, the batch geometry, the model, the LoRA
# rank, the seed, the optimizer and LR schedule) must equal the checkpoint's.
RESUME_CHANGEABLE = frozenset(
    {
        "max_train_steps",
        "num_train_epochs",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "report_to",
        "logging_dir",
        "tracker_name",
        "no_progress",
        "run_validation",
        "validation_steps",
        "validation_prompts",
        "validation_inference_steps",
        "validation_scorer",
        "scorer_weights",
        "push_to_hub",
        "hub_model_id",
        "allow_tf32",
        "enable_xformers_memory_efficient_attention",
        "prior_generation_precision",
        "dataloader_num_workers",
        "vae_encode_batch_size",
        "offload",
        "latent_cache_dir",
        "cache_dir",
        "max_nonfinite_steps",
        "loss_backend",
        "gradient_checkpointing",
        "print_memory_plan",
    }
)
# Not recorded: a secret, and where the run is and how this command reached it.
NOT_RECORDED = frozenset({"hub_token", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "local_rank"})
# Per-process sizes: compared as the global batch (train_batch_size x processes) instead.
PER_PROCESS = frozenset({"train_batch_size"})
PATHS = ("pretrained_model_name_or_path", "dataset_name", "pretrained_vae_model_name_or_path")


def recorded_settings(data_args: DataArguments, config: TrainConfig, run: RunArguments, processes: int) -> dict:
    """The settings a checkpoint records (JSON values; local paths absolute), and
    ``global_batch_size``: what :func:`resume_differences` compares."""
    values = {**vars(data_args), **dataclasses.asdict(config), **vars(run)}
    values = {k: v for k, v in values.items() if not k.startswith("_") and k not in NOT_RECORDED}
    for name in PATHS:
        if values.get(name) and Path(values[name]).expanduser().exists():
            values[name] = os.path.abspath(Path(values[name]).expanduser())
    values["global_batch_size"] = run.train_batch_size * processes
    return json.loads(json.dumps(values, default=str))


def resume_differences(recorded: dict, current: dict) -> tuple:
    """``(refused, changed)``: lines ``--flag recorded (this command: value)`` for the settings
    that differ from the checkpoint's, split by :data:`RESUME_CHANGEABLE`. A setting the
    checkpoint does not record (written by an older fastpref) is not compared."""
    refused: List[str] = []
    changed: List[str] = []
    for name, value in current.items():
        if name not in recorded or name in PER_PROCESS or recorded[name] == value:
            continue
        flag = "--train_batch_size x processes" if name == "global_batch_size" else f"--{name}"
        line = f"{flag} {recorded[name]} (this command: {value})"
        (changed if name in RESUME_CHANGEABLE else refused).append(line)
    return refused, changed


def check_resume_settings(recorded: Optional[dict], current: dict, checkpoint: str) -> List[str]:
    """Refuse a resume whose command changes what the run means (:class:`ArgumentError` naming
    every difference in one line); returns the lines of the changes it applies (to be logged)."""
    if not recorded:
        return []
    refused, changed = resume_differences(recorded, current)
    if refused:
        raise ArgumentError(
            f"--resume_from_checkpoint: {checkpoint} was trained with other settings: {'; '.join(refused)}. A resume "
            "continues the run as it was: drop or change these flags, or start a new run in another --output_dir"
        )
    return changed


def check_streaming(data_args: DataArguments, settings: dict, given: Optional[set]) -> List[str]:
    """``--streaming`` against the flags it cannot serve (:class:`ArgumentError` naming the flag);
    returns the notes to log (the flags it leaves unused)."""
    if data_args.shuffle_buffer_size < 1:
        raise ArgumentError(f"--shuffle_buffer_size must be >= 1, got {data_args.shuffle_buffer_size}")
    if not data_args.streaming:
        if given is not None and "shuffle_buffer_size" in given:
            raise ArgumentError("--shuffle_buffer_size: only with --streaming (the map-style order is a full shuffle)")
        return []
    refusals = [
        (data_args.cache_latents, "--cache_latents", "the latent cache is built over the whole split, map-style"),
        (settings["loss_type"] == "dedpo", "--loss_type dedpo", "DeDPO's propensity m/n counts all pairs"),
        (data_args.flip_rate > 0, "--flip_rate", "the flipped subset is drawn over all pairs"),
        (data_args.max_train_samples is not None, "--max_train_samples", "the seeded subset is drawn over all pairs"),
        (settings.get("footprint_recipe") == "authors", "--footprint_recipe authors", "it restarts at every epoch"),
    ]
    for refused, flag, why in refusals:
        if refused:
            raise ArgumentError(f"{flag}: not with --streaming ({why}; a stream has no length): drop one of them")
    if Path(data_args.dataset_name).expanduser().exists():  # a local source: its files now (a Hub id's at start)
        from .data.streaming import stream_source

        try:
            stream_source(data_args.dataset_name, data_args.dataset_split_name)
        except (ValueError, FileNotFoundError) as error:
            raise ArgumentError(str(error)) from None
    if settings["max_train_steps"] is None:
        raise ArgumentError(
            "--max_train_steps: --streaming needs it (a stream has no length, so --num_train_epochs cannot size the "
            "run; an epoch is one pass over the stream)"
        )
    if data_args.dataloader_num_workers:
        return [
            f"--dataloader_num_workers {data_args.dataloader_num_workers}: unused with --streaming (the pairs are "
            "read and decoded in the main process, which keeps their position for the checkpoints)"
        ]
    return []
