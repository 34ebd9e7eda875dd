"""``fastpref train``: the command that fine-tunes SD 1.5 / SDXL on Pick-a-Pic preference pairs.

    fastpref train --pretrained_model_name_or_path MODEL --dataset_name DATA --output_dir OUT [...]
    accelerate launch -m fastpref.train ...          # several processes (DDP)

Its flags are generated from :class:`DataArguments`, ``TrainConfig`` and :class:`RunArguments`
(names as diffusers' ``train_diffusion_dpo.py`` where the concept is the same); :func:`train`
runs the steps below them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import field
from pathlib import Path
from typing import List, Literal, Optional, Set, Tuple

import torch

import fastpref

from . import data, hub
from .arch import detect_arch
from .checkpoints import (
    install_lora_hooks,
    new_run_id,
    resolve_resume,
    resume,
    save_checkpoint,
    save_weights,
)
from .config import ARCH_DEFAULTS, DIFFUSERS_LOSS_TYPES, TrainConfig
from .files import replace_durably, write_text_atomic
from .latent_cache import LatentCache
from .model_card import write_model_card
from .models import ModelSource
from .trainer import NonFiniteLossError, PreferenceTrainer
from .validation import INFERENCE_STEPS, TURBO_INFERENCE_STEPS, VALIDATION_PROMPTS, run_validation

logger = logging.getLogger("fastpref.train")

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
DEFAULT_CACHE = Path(os.environ.get("FASTPREF_CACHE", Path.home() / ".cache" / "fastpref")) / "latents"
PriorPrecision = Literal["no", "fp32", "fp16", "bf16"]
TRACKER_NAMES = {"sd15": "diffusion-dpo-lora", "sdxl": "diffusion-dpo-lora-sdxl"}  # diffusers' scripts' defaults


@dataclasses.dataclass
class DataArguments:
    """What to train on: the pipeline folder and the preference data."""

    _argument_group_name = "model and data"

    pretrained_model_name_or_path: str = field(
        metadata={
            "help": "local diffusers pipeline folder (or a hub id where the hub is reachable); SDXL is detected from it"
        }
    )
    dataset_name: str = field(
        metadata={
            "help": "the preference pairs: a Hub id (datasets.load_dataset, e.g. yuvalkirstain/pickapic_v2), a "
            "local folder in the Hub's layout (data/train-*.parquet ...), a parquet file or folder, or a "
            "save_to_disk folder; Pick-a-Pic v2 columns (see the --*_column flags)"
        }
    )
    revision: Optional[str] = field(
        default=None, metadata={"help": "revision (branch, tag or commit) of the pretrained model on the hub"}
    )
    variant: Optional[str] = field(
        default=None,
        metadata={"help": "variant of the model files, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)"},
    )
    pretrained_vae_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "a VAE to use instead of the pipeline's (e.g. an fp16-safe SDXL VAE); its folder or hub id"},
    )
    resolution: Optional[int] = field(
        default=None,
        metadata={"help": "training resolution in pixels, a multiple of 8; default 512 (sd15) / 1024 (sdxl)"},
    )
    dataset_split_name: str = field(default="train", metadata={"help": "the split of --dataset_name to train on"})
    cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "the Hugging Face datasets cache (downloads and the Arrow files of parquet data); default "
            "$HF_DATASETS_CACHE"
        },
    )
    caption_column: str = field(default=data.CAPTION, metadata={"help": "the column of the captions"})
    image_column_0: str = field(default=data.IMAGE_0, metadata={"help": "the column of the first image (bytes)"})
    image_column_1: str = field(default=data.IMAGE_1, metadata={"help": "the column of the second image (bytes)"})
    label_column: str = field(
        default=data.LABEL, metadata={"help": "the column of the label: 1 first image preferred, 0 second, 0.5 tie"}
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": "train on a random subset of N usable pairs, seeded by --seed (as datasets' "
            "shuffle(seed).select(range(N)) in diffusers' script)"
        },
    )
    no_hflip: bool = field(
        default=False,
        metadata={
            "help": "no random horizontal flips (flips are on by default, as in diffusers); uncached runs only: "
            "--cache_latents encodes each image once, unflipped"
        },
    )
    random_crop: bool = field(
        default=False,
        metadata={
            "help": "crop at a random position instead of the centre; uncached runs only (cached latents are "
            "deterministic): refused with --cache_latents"
        },
    )
    keep_ties: bool = field(default=False, metadata={"help": "keep pairs with label_0 == 0.5 (dropped by default)"})
    flip_rate: float = field(
        default=0.0,
        metadata={"help": "flip the labels of this share of pairs (a seeded random subset), to study label noise"},
    )
    flip_seed: int = field(default=0, metadata={"help": "seed of the flipped subset"})
    cache_latents: bool = field(
        default=False,
        metadata={
            "help": "encode VAE latents and text embeddings once (reused across runs and resumes); no random "
            "flips or crops then"
        },
    )
    latent_cache_dir: str = field(
        default=str(DEFAULT_CACHE), metadata={"help": "where the latent cache lives ($FASTPREF_CACHE/latents)"}
    )
    vae_encode_batch_size: int = field(
        default=8, metadata={"help": "images per VAE call, when caching latents and in uncached steps"}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    human_fraction: Optional[float] = field(
        default=None,
        metadata={
            "help": "dedpo: share of pairs that keep their human label (the rest use the judge's synthetic_label_0)"
        },
    )
    human_seed: int = field(default=0, metadata={"help": "dedpo: seed of which pairs keep their human label"})


@dataclasses.dataclass
class RunArguments:
    """How the run goes: batch size and length, checkpoints, logs, validation images, the Hub."""

    _argument_group_name = "run: batches, checkpoints, logs, validation and the Hub"

    output_dir: str = field(metadata={"help": "where weights, checkpoints and logs go"})
    train_batch_size: int = field(default=4, metadata={"help": "pairs per process per micro-step"})
    num_train_epochs: int = field(default=1, metadata={"help": "epochs, when --max_train_steps is not given"})
    scale_lr: bool = field(
        default=False, metadata={"help": "multiply the learning rate by batch size x accumulation x processes"}
    )
    checkpointing_steps: int = field(
        default=500,
        metadata={"help": "save a checkpoint every N optimizer steps (0: only the final one, always saved)"},
    )
    checkpoints_total_limit: Optional[int] = field(
        default=None, metadata={"help": "keep at most N >= 1 of this run's checkpoints (default: all)"}
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "a checkpoint folder, or 'latest' in --output_dir (the newest usable one)"},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "start a new run in an --output_dir that holds one: its contents are moved aside to "
            "OUTPUT_DIR.old-N first"
        },
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none"})
    logging_dir: str = field(default="logs", metadata={"help": "TensorBoard folder inside --output_dir"})
    tracker_name: Optional[str] = field(
        default=None, metadata={"help": "the trackers' project name (TensorBoard: a folder in --logging_dir)"}
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})
    run_validation: bool = field(
        default=False,
        metadata={
            "help": "sample --validation_prompts with the current weights every --validation_steps and at the end "
            "(fixed seed); images go to the trackers and to OUTPUT_DIR/validation/step-N/"
        },
    )
    validation_steps: int = field(default=200, metadata={"help": "validate every N optimizer steps"})
    validation_prompts: List[str] = field(
        default_factory=lambda: list(VALIDATION_PROMPTS), metadata={"help": "the prompts sampled at validation"}
    )
    validation_inference_steps: Optional[int] = field(
        default=None, metadata={"help": "denoising steps of each validation image"}
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "upload --output_dir to the Hub at the end (the Hub and a token are checked at start-up)"},
    )
    hub_token: Optional[str] = field(
        default=None, metadata={"help": "Hub token for --push_to_hub (default: the one `hf auth login` saved)"}
    )
    hub_model_id: Optional[str] = field(
        default=None, metadata={"help": "the Hub repository of --push_to_hub (default: --output_dir's name)"}
    )
    allow_tf32: bool = field(default=False, metadata={"help": "let CUDA matmuls and cuDNN use TF32 (Ampere and later)"})
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "xformers attention in the UNet (pip install 'fastpref[xformers]')"}
    )
    prior_generation_precision: Optional[PriorPrecision] = field(
        default=None,
        metadata={"help": "accepted for diffusers' command lines and unused, as in diffusers' DPO scripts"},
    )
    local_rank: int = field(
        default=-1,
        metadata={"help": "accepted for torch.distributed launchers; accelerate reads the rank from the environment"},
    )


# TrainConfig fields whose command-line default depends on the run: not given, they are resolved
# from the model's architecture, the data or accelerate (what the help says).
RUN_DEFAULTS = {
    "beta": "the paper's {sd15[beta]:g} (sd15) / {sdxl[beta]:g} (sdxl)".format(**ARCH_DEFAULTS),
    "k1": "the paper's {sd15[k1]:g} (sd15) / {sdxl[k1]:g} (sdxl)".format(**ARCH_DEFAULTS),
    "max_train_steps": "--num_train_epochs over the data",
    "mixed_precision": "accelerate's configuration, else no",
    "tracker_name": "{sd15} (sd15) / {sdxl} (sdxl), diffusers' names".format(**TRACKER_NAMES),
    "validation_inference_steps": f"{INFERENCE_STEPS} ({TURBO_INFERENCE_STEPS} with --is_turbo), as diffusers",
}


# diffusers' train_diffusion_dpo.py defaults where fastpref's differ, on fastpref's scale (its SDXL
# script's --beta_dpo 5000 is multiplied by 0.5 in its loss: 2500 here too). The run logs each one
# a command leaves to its default (:func:`defaults_that_differ`).
DIFFUSERS_DEFAULTS = {
    "loss_type": "sigmoid",
    "beta": 2500.0,
    "lora_rank": 4,
    "learning_rate": 5e-4,
    "lr_warmup_steps": 500,
    "seed": None,
    "dataset_split_name": "validation",
}
WHY_DIFFERENT = {
    "loss_type": "fastpref's objective is Adaptive-DPO; --loss_type sigmoid (= dpo) is diffusers' Diffusion-DPO",
    "beta": "the Adaptive-DPO paper's value for this architecture",
    "lora_rank": "the Adaptive-DPO paper's rank",
    "learning_rate": "the Adaptive-DPO paper's rate",
    "lr_warmup_steps": "diffusers' own README commands pass 0",
    "seed": "diffusers leaves an unseeded run; fastpref's runs are reproducible",
    "dataset_split_name": "a run trains on the data set's training split unless told otherwise",
}


def defaults_that_differ(values: dict, arch: str, given: Optional[Set[str]] = None) -> List[str]:
    """One line per :data:`DIFFUSERS_DEFAULTS` flag left to a fastpref default other than
    diffusers'. ``values``: the parsed fields (of any of the three dataclasses); ``given``: the
    flags the command line sets (:func:`given_flags`; ``None``: the values that differ from
    their field's default count as given)."""
    fields = {f.name: f for group in (DataArguments, TrainConfig, RunArguments) for f in dataclasses.fields(group)}
    if given is None:
        given = {name for name in DIFFUSERS_DEFAULTS if values[name] not in (None, fields[name].default)}
    lines = []
    for name, theirs in DIFFUSERS_DEFAULTS.items():
        if name in given:
            continue
        ours = ARCH_DEFAULTS[arch][name] if values[name] is None else values[name]
        if DIFFUSERS_LOSS_TYPES.get(theirs, theirs) != ours:
            flag = fields[name].metadata.get("aliases", [f"--{name}"])[0]  # diffusers' spelling: --beta_dpo, --rank
            lines.append(f"{flag}: fastpref's default is {ours}, diffusers' is {theirs} ({WHY_DIFFERENT[name]})")
    return lines


def build_parser():
    """The flags of :class:`DataArguments`, :class:`~fastpref.train.config.TrainConfig` and
    :class:`RunArguments`, with their defaults, choices and help (``fastpref train --help``)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (DataArguments, TrainConfig, RunArguments),
        prog="fastpref train",
        description="Preference fine-tuning (Diffusion-DPO, Adaptive-DPO, IPO, robust DPO, cDPO, SFT, DeDPO) "
        "of SD 1.5 / SDXL.",
    )
    parser.set_defaults(**dict.fromkeys(RUN_DEFAULTS))
    for action in parser._actions:
        if action.dest in RUN_DEFAULTS:
            action.help = f"{action.help}; fastpref train's default: {RUN_DEFAULTS[action.dest]}"
    return parser


def parse_args(argv=None, parser=None) -> Tuple[DataArguments, dict, RunArguments]:
    """``(data, settings, run)``: ``settings`` are the TrainConfig fields as given (``None`` for
    the :data:`RUN_DEFAULTS` not given); :func:`train_config` resolves them. Unchecked: see
    :func:`check_arguments`."""
    values = vars((parser or build_parser()).parse_args(argv))

    def take(cls) -> dict:
        return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}

    return DataArguments(**take(DataArguments)), take(TrainConfig), RunArguments(**take(RunArguments))


def given_flags(argv=None, parser=None) -> Set[str]:
    """The fields the command line ``argv`` sets itself (rather than leaving them to their default)."""
    parser = parser or build_parser()
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parser.parse_args(argv, namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}


# --------------------------------------------------------------------------------------------
# the arguments, checked before any work
# --------------------------------------------------------------------------------------------

# What a run leaves in its --output_dir: a fresh run stops rather than mix with them.
RUN_FILES = ("checkpoint-*", "pytorch_lora_weights.safetensors", "unet", LOG_FILE, SUMMARY_FILE)
REPORT_TO = ("tensorboard", "wandb", "all", "none")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ArgumentError(ValueError):
    """A bad command-line argument; the message starts with the flag."""


def check_arguments(data_args: DataArguments, settings: dict, run: RunArguments) -> None:
    """Every argument of ``fastpref train``, before any heavy import or data read: the paths
    first (with the path in the message), then the values. :class:`ArgumentError` whose message
    names the flag and what it allows."""
    check_model_path(data_args.pretrained_model_name_or_path, data_args.revision)
    check_dataset_path(data_args.dataset_name)
    check_output_dir(run)
    check_data_values(data_args, settings["loss_type"])
    check_run_values(run)
    check_train_settings(settings)
    if settings["is_turbo"] and detect_arch(data_args.pretrained_model_name_or_path, data_args.revision) != "sdxl":
        raise ArgumentError(
            f"--is_turbo: {data_args.pretrained_model_name_or_path} holds an SD 1.5 UNet; SDXL Turbo is an SDXL model"
        )
    check_installed(run)
    if run.push_to_hub:
        try:
            hub.check_hub(run.hub_token)
        except hub.HubError as error:
            raise ArgumentError(f"--push_to_hub: {error}") from None


def check_model_path(value: str, revision: Optional[str] = None) -> None:
    """A local diffusers pipeline folder, or an ``org/name`` Hub id the Hub (or its cache) serves."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ArgumentError(
                f"--pretrained_model_name_or_path: {value} is not a diffusers pipeline folder "
                "(no model_index.json or unet/)"
            )
        return
    if path.exists():
        raise ArgumentError(f"--pretrained_model_name_or_path: {value} is a file, not a pipeline folder")
    if not HUB_ID.match(value):
        raise ArgumentError(f"--pretrained_model_name_or_path: no such folder: {value}")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(value, "model_index.json", revision=revision)
    except Exception as error:  # offline, unknown repository, gated, ...: all mean "not usable here"
        raise ArgumentError(
            f"--pretrained_model_name_or_path: {value} is no local folder, and the Hub does not serve it here "
            f"({type(error).__name__})"
        ) from None


def check_dataset_path(value: str) -> None:
    """A local file or folder (read later by :func:`~fastpref.train.data.open_split`), or what
    looks like a Hub id (``org/name``; ``datasets.load_dataset`` says later whether it loads)."""
    if not Path(value).expanduser().exists() and not HUB_ID.match(value):
        raise ArgumentError(f"--dataset_name: no such file or folder: {value} (and not a Hub id, org/name)")


def check_output_dir(run: RunArguments) -> None:
    """``--output_dir`` is a folder this process can write in, or can be made in one (nothing is
    created here); a fresh run needs it unused (or ``--overwrite_output_dir``);
    ``--resume_from_checkpoint`` names a checkpoint."""
    output_dir = Path(run.output_dir)
    existing = next(p for p in (output_dir, *Path(os.path.abspath(output_dir)).parents) if p.exists())
    if not existing.is_dir():
        raise ArgumentError(f"--output_dir: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ArgumentError(f"--output_dir: cannot write in {existing} ({error.strerror or error})") from None
    if run.resume_from_checkpoint:
        if run.overwrite_output_dir and run.resume_from_checkpoint == "latest":
            raise ArgumentError("--overwrite_output_dir: cannot be combined with --resume_from_checkpoint latest")
        try:
            resolve_resume(run.resume_from_checkpoint, output_dir)
        except FileNotFoundError as error:
            raise ArgumentError(str(error)) from None
        return
    used = used_by_a_run(output_dir)
    if used and not run.overwrite_output_dir:
        raise ArgumentError(
            f"--output_dir: {output_dir} already holds a run ({', '.join(used)}); continue it with "
            "--resume_from_checkpoint latest, or start a new run there with --overwrite_output_dir "
            "(moves the old contents aside)"
        )


def used_by_a_run(output_dir: Path) -> List[str]:
    """The names in ``output_dir`` that a run wrote (:data:`RUN_FILES`), sorted."""
    return sorted({path.name for pattern in RUN_FILES for path in output_dir.glob(pattern)})


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


def check_train_settings(settings: dict) -> None:
    """The :class:`TrainConfig` fields as given, through TrainConfig's own checks (the
    :data:`RUN_DEFAULTS` not given stand in with valid values until :func:`train_config`)."""
    stand_ins = {**ARCH_DEFAULTS["sd15"], "max_train_steps": 1, "mixed_precision": "no"}
    values = {name: stand_ins.get(name) if value is None else value for name, value in settings.items()}
    try:
        TrainConfig(**values)
    except (ValueError, TypeError) as error:
        raise ArgumentError(flagged(str(error))) from None


def flagged(message: str) -> str:
    """A :class:`TrainConfig` message (it starts with the field's name) with the flag's name."""
    for field_ in sorted(dataclasses.fields(TrainConfig), key=lambda f: -len(f.name)):
        if message.startswith(field_.name):
            return "--" + message
    return message


# --------------------------------------------------------------------------------------------
# the run, step by step
# --------------------------------------------------------------------------------------------


def make_accelerator(run: RunArguments, mixed_precision: Optional[str]):
    """The run's ``Accelerator`` (trackers, project folders) and its logging."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(run.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=1,  # the trainer accumulates itself (it needs the window for skips)
        mixed_precision=mixed_precision,
        log_with=None if run.report_to == "none" else run.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / run.logging_dir)),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of the frozen weights (encoders, a LoRA run's base UNet): the mixed precision's."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@dataclasses.dataclass
class TrainData:
    """What :func:`load_data` prepared: the dataset served (pixels, or latents from the cache),
    the batch encoder, the data summary (the split, ``num_pairs``, the counts; its
    ``undecodable_at_fetch`` kept up to date by the encoder) and, for dedpo, the judge's agreement
    with the humans."""

    dataset: torch.utils.data.Dataset
    encode: data.BatchEncoder
    summary: dict
    judge: Optional[dict]


def load_data(
    data_args: DataArguments, loss_type: str, arch: str, resolution: int, accelerator, seed: int = 0
) -> TrainData:
    """Open the split of preference pairs (:func:`~fastpref.train.data.open_split`, on the main
    process first) and either encode them once into the latent cache (``--cache_latents``; the
    work split across processes) or load the encoders for every batch. ``seed`` (``--seed``)
    draws the ``--max_train_samples`` subset and the random crops and flips. Registers the
    count of rows skipped at fetch in the checkpoints."""
    from accelerate.utils import gather_object

    dedpo = loss_type == "dedpo"
    dataset_kwargs = dict(
        split=data_args.dataset_split_name,
        cache_dir=data_args.cache_dir,
        keep_ties=data_args.keep_ties,
        flip_rate=data_args.flip_rate,
        flip_seed=data_args.flip_seed,
        max_pairs=data_args.max_train_samples,
        subset_seed=seed,
        hflip=not data_args.no_hflip and not data_args.cache_latents,
        random_crop=data_args.random_crop,
        augment_seed=seed,
        caption_column=data_args.caption_column,
        image_columns=(data_args.image_column_0, data_args.image_column_1),
        label_column=data_args.label_column,
    )
    if dedpo:
        dataset_kwargs.update(
            synthetic_labels=True, human_fraction=data_args.human_fraction, human_seed=data_args.human_seed
        )
    with accelerator.main_process_first():  # one process converts or downloads, the others reuse it
        dataset = data.PreferenceDataset(data_args.dataset_name, resolution, check_images=False, **dataset_kwargs)
    if len(dataset) == 0:
        raise ValueError(f"dataset_name: no usable pairs in {data_args.dataset_name} ({dataset.summary()})")
    if data_args.cache_latents and not data_args.no_hflip:
        logger.info("--cache_latents: images are encoded once, without random flips (as with --no_hflip)")
    model_path = data_args.pretrained_model_name_or_path
    models = dict(
        revision=data_args.revision, variant=data_args.variant, vae_path=data_args.pretrained_vae_model_name_or_path
    )
    vae = tokenizers = text_encoders = None
    if data_args.cache_latents:
        cache = LatentCache.build(
            dataset,
            data_args.latent_cache_dir,
            model_path,
            dtype=weight_dtype(accelerator),
            device=accelerator.device,
            batch_size=data_args.vae_encode_batch_size,
            accelerator=accelerator,
            **models,
        )
        train_set = cache.view(dataset)
        logger.info("latent cache %s: %s", "hit" if cache.hit else "built", cache.path)
    else:
        vae, tokenizers, text_encoders = data.load_encoders(
            model_path, arch, dtype=weight_dtype(accelerator), device=accelerator.device, **models
        )
        train_set = dataset
    summary = getattr(train_set, "dataset", dataset).summary()  # the cache view knows the undecodable rows
    summary["undecodable_at_fetch"] = 0
    logger.info("data: %s", summary)
    judge = dataset.judge_agreement() if dedpo else None
    if judge is not None:
        logger.info(
            "judge vs human labels on the %d human-labelled pairs: accuracy %.3f, mean |p - y| %.3f",
            judge["num_labelled"],
            judge["accuracy"],
            judge["mean_abs_error"],
        )
    skips = data.FetchSkips()
    skips.install(accelerator)
    encode = data.BatchEncoder(
        vae,
        tokenizers,
        text_encoders,
        resolution,
        accelerator.device,
        vae_batch_size=data_args.vae_encode_batch_size,
        skips=skips,
        summary=summary,
        gather=gather_object if accelerator.num_processes > 1 else None,
    )
    return TrainData(train_set, encode, summary, judge)


def check_backend(backend: str, device) -> None:
    """``--loss_backend`` can serve tensors on ``device`` (not only at the first step)."""
    if backend == "auto":
        return
    reason = fastpref.availability(device)[backend]
    if reason is not None:
        raise ArgumentError(f"--loss_backend {backend} cannot run on {device}: {reason}")


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


def check_batch_fits(batch_size: int, processes: int, summary: dict, dataset_name: str) -> None:
    """A global batch holds distinct pairs: fewer usable pairs than it would repeat some in every batch."""
    if batch_size * processes > summary["pairs"]:
        raise ArgumentError(
            f"--train_batch_size {batch_size} x {processes} process(es) is more than the {summary['pairs']} usable "
            f"pairs in {dataset_name}: every batch would repeat pairs; lower --train_batch_size"
        )


def train_config(settings: dict, arch: str, num_pairs: int, run: RunArguments, accelerator) -> TrainConfig:
    """The :class:`TrainConfig` of the parsed ``settings``, the :data:`RUN_DEFAULTS` resolved:
    beta and k1 from ``arch``, the step count from the epochs, the mixed precision from
    accelerate; ``--scale_lr`` applied."""
    values = dict(settings)
    for name in ("beta", "k1"):
        if values[name] is None:
            values[name] = ARCH_DEFAULTS[arch][name]
    world = accelerator.num_processes
    if values["max_train_steps"] is None:
        pairs_per_step = run.train_batch_size * world * values["gradient_accumulation_steps"]
        values["max_train_steps"] = run.num_train_epochs * max(1, math.ceil(num_pairs / pairs_per_step))
    if run.scale_lr:
        values["learning_rate"] *= run.train_batch_size * values["gradient_accumulation_steps"] * world
    values["mixed_precision"] = accelerator.mixed_precision
    return TrainConfig(**values)


def build_trainer(
    source: ModelSource, arch: str, config: TrainConfig, run: RunArguments, accelerator
) -> PreferenceTrainer:
    """The UNet and noise schedule of the pipeline in a :class:`PreferenceTrainer` (``--is_turbo``:
    the zero terminal SNR schedule; xformers attention on request); a LoRA run checkpoints its
    adapter only, plus a copy in diffusers' LoRA format."""
    # LoRA keeps the frozen base in the mixed-precision dtype; a full fine-tune trains float32 weights
    unet = source.load_unet(weight_dtype(accelerator) if config.lora_rank > 0 else torch.float32)
    if run.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    noise_scheduler = source.load_noise_scheduler(zero_terminal_snr=config.is_turbo)
    trainer = PreferenceTrainer(unet, noise_scheduler, config, accelerator)
    if config.lora_rank > 0:
        install_lora_hooks(accelerator, type(trainer.base_unet), arch)
    return trainer


def make_loader(dataset, batch_size: int, num_workers: int, trainer: PreferenceTrainer, accelerator):
    """Batches of this process: the global batch (``batch_size`` x processes) is consecutive
    positions of one seeded :class:`~fastpref.train.data.PairSampler` stream, started where the
    trainer's step left it, and accelerate's ``BatchSamplerShard`` gives each process its slice."""
    from accelerate.data_loader import BatchSamplerShard

    world = accelerator.num_processes
    start = trainer.micro_step * batch_size * world
    order = data.PairSampler(len(dataset), seed=trainer.config.seed, start=start, infinite=True, with_position=True)
    global_batches = torch.utils.data.BatchSampler(order, batch_size * world, drop_last=True)
    shard = BatchSamplerShard(global_batches, world, accelerator.process_index, split_batches=True)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=shard, collate_fn=data.collate_pairs, num_workers=num_workers
    )


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
    trainer: PreferenceTrainer, batches, encode, run: RunArguments, run_id: str, accelerator, validate=None
) -> None:
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


def hparams(*groups) -> dict:
    """The run's settings as tracker hyper-parameters (scalars and strings only)."""
    values = {}
    for group in groups:
        values.update(group if isinstance(group, dict) else dataclasses.asdict(group))
    values = {k: str(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}


def train(data_args: DataArguments, settings: dict, run: RunArguments, given: Optional[Set[str]] = None) -> dict:
    """One ``fastpref train`` run (``settings``: the TrainConfig fields as parsed; ``given``: the
    fields its command line set, see :func:`defaults_that_differ`); returns the summary written
    to ``train_summary.json``.

    Detects the architecture from the pipeline's UNet config, opens the preference pairs with
    ``datasets`` (:class:`~fastpref.train.data.PreferenceDataset`: winner first, ties dropped unless
    ``--keep_ties``, seeded ``--flip_rate`` flips, bad rows skipped and counted), optionally
    encodes them once into the latent cache, and runs a
    :class:`~fastpref.train.trainer.PreferenceTrainer` for ``max_train_steps`` optimizer steps.
    Outputs in ``--output_dir``:

    - ``pytorch_lora_weights.safetensors`` (LoRA; ``pipe.load_lora_weights(output_dir)``) or
      ``unet/`` (full fine-tune, safetensors);
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

    check_arguments(data_args, settings, run)
    output_dir = Path(run.output_dir)
    source = ModelSource.of(data_args)
    arch = detect_arch(source.path, source.revision)
    resolution = data_args.resolution if data_args.resolution is not None else (1024 if arch == "sdxl" else 512)
    accelerator = make_accelerator(run, settings["mixed_precision"])
    log_differences(data_args, settings, run, arch, given)
    allow_tf32(run.allow_tf32)
    check_backend(settings["loss_backend"], accelerator.device)
    set_seed(settings["seed"])
    repo_id = None
    if accelerator.is_main_process:
        if run.overwrite_output_dir and not run.resume_from_checkpoint:
            move_aside(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if run.push_to_hub:
            repo_id = hub.create_repository(run.hub_model_id, output_dir, run.hub_token)
    accelerator.wait_for_everyone()

    inputs = load_data(data_args, settings["loss_type"], arch, resolution, accelerator, seed=settings["seed"])
    check_batch_fits(run.train_batch_size, accelerator.num_processes, inputs.summary, data_args.dataset_name)
    config = train_config(settings, arch, len(inputs.dataset), run, accelerator)
    trainer = build_trainer(source, arch, config, run, accelerator)
    resumed = resume(accelerator, trainer, run.resume_from_checkpoint, output_dir, output_dir / LOG_FILE)
    run_id = resumed["run_id"] if resumed else new_run_id()
    if accelerator.is_main_process and run.report_to != "none":
        accelerator.init_trackers(run.tracker_name or TRACKER_NAMES[arch], config=hparams(data_args, settings, run))

    validated = {}  # step -> the validation images of that step

    def validate():
        validated[trainer.global_step] = run_validation(trainer, source, arch, run, resolution, output_dir)

    loader = make_loader(inputs.dataset, run.train_batch_size, data_args.dataloader_num_workers, trainer, accelerator)
    started = time.perf_counter()
    run_steps(trainer, iter(loader), inputs.encode, run, run_id, accelerator, validate if run.run_validation else None)

    save_checkpoint(accelerator, output_dir, trainer.global_step, run.checkpoints_total_limit, run_id)
    save_weights(accelerator, trainer, arch, output_dir)
    if run.run_validation and accelerator.is_main_process and trainer.global_step not in validated:
        validate()  # the final weights
    result = {
        "status": "finished",
        "arch": arch,
        "global_step": trainer.global_step,
        "skipped_steps": trainer.skipped_steps,
        "seconds": time.perf_counter() - started,
        "data": inputs.summary,
        "loss_type": config.loss_type,
        "beta": config.beta,
        "k1": config.k1,
        "processes": accelerator.num_processes,
    }
    if inputs.judge is not None:
        result["judge_agreement"] = inputs.judge
    if accelerator.is_main_process:
        text = json.dumps(result, indent=2) + "\n"
        write_text_atomic(output_dir / SUMMARY_FILE, text)
        write_model_card(
            output_dir,
            source.path,
            arch,
            config.loss_type,
            card_settings(config, run, resolution, accelerator.num_processes, data_args.dataset_name),
            run.validation_prompts,
            validated.get(trainer.global_step, []),
            lora=config.lora_rank > 0,
        )
        if repo_id is not None:
            hub.push(repo_id, output_dir, run.hub_token)
    accelerator.end_training()
    return result


def log_differences(
    data_args: DataArguments, settings: dict, run: RunArguments, arch: str, given: Optional[Set[str]]
) -> None:
    """The run's first log lines: where it departs from what diffusers' DPO scripts would do with
    the same command."""
    for line in defaults_that_differ({**vars(data_args), **settings, **vars(run)}, arch, given):
        logger.warning("default differs from diffusers' script: %s", line)
    if arch == "sdxl" and settings["beta"] is not None:
        logger.warning(
            "--beta_dpo %g: fastpref's scale for every architecture; diffusers' train_diffusion_dpo_sdxl.py halves "
            "its --beta_dpo (its --beta_dpo %g is this run's)",
            settings["beta"],
            2 * settings["beta"],
        )
    if run.prior_generation_precision is not None:
        logger.warning("--prior_generation_precision: unused (diffusers' DPO scripts do not use it either)")


def allow_tf32(allow: bool) -> None:
    """``--allow_tf32``: CUDA matmuls and cuDNN convolutions may use TF32 (Ampere and later)."""
    if allow:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        logger.info("--allow_tf32: TF32 matmuls and cuDNN convolutions allowed")


def card_settings(config: TrainConfig, run: RunArguments, resolution: int, processes: int, dataset: str) -> dict:
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


def main(argv=None) -> int:
    """``fastpref train``; exit code 2 for bad arguments (argparse's usage and message) or data,
    3 for a non-finite abort."""
    parser = build_parser()
    data_args, settings, run = parse_args(argv, parser)
    try:
        check_arguments(data_args, settings, run)
    except ArgumentError as error:
        parser.error(str(error))  # exits 2
    try:
        train(data_args, settings, run, given_flags(argv, parser))
    except (ValueError, FileNotFoundError) as error:
        print(f"fastpref train: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:  # the message says what to do
        print(f"fastpref train: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
