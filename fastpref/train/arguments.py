"""``fastpref train``'s flags: :class:`DataArguments` (model and data),
:class:`~fastpref.train.config.TrainConfig` (the training step) and :class:`RunArguments`
(batches, checkpoints, logs, validation, the Hub), parsed with ``transformers.HfArgumentParser``
(names as diffusers' ``train_diffusion_dpo.py`` where the concept is the same), and the
comparison of fastpref's defaults with diffusers' (:func:`defaults_that_differ`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import field
from pathlib import Path
from typing import List, Literal, Optional, Set, Tuple

from fastpref.scorers.flags import CHOICES as SCORER_CHOICES
from fastpref.scorers.flags import WEIGHTS_HELP

from . import data
from .config import DIFFUSERS_LOSS_TYPES, TrainConfig
from .families import FAMILIES, ModelFamily
from .families.sd15 import INFERENCE_STEPS
from .families.sdxl import TURBO_STEPS
from .validation import VALIDATION_PROMPTS


class ArgumentError(ValueError):
    """A bad command-line argument; the message starts with the flag."""


DEFAULT_CACHE = Path(os.environ.get("FASTPREF_CACHE", Path.home() / ".cache" / "fastpref")) / "latents"
PriorPrecision = Literal["no", "fp32", "fp16", "bf16"]


def _per_family(field_name: str, what: str) -> str:
    """The help's list of a family default: ``what 1000 (sd15) / 2500 (sdxl)``."""
    values = " / ".join(f"{getattr(family.defaults, field_name):g} ({name})" for name, family in FAMILIES.items())
    return f"{what}{values}"


@dataclasses.dataclass
class DataArguments:
    """What to train on: the pipeline folder and the preference data."""

    _argument_group_name = "model and data"

    pretrained_model_name_or_path: str = field(
        metadata={
            "help": "local diffusers pipeline folder (or a hub id where the hub is reachable); its model family "
            "(sd15, sdxl, sd3, flux) is recognised from its configs"
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
        metadata={"help": "training resolution in pixels, a multiple of 8; default " + _per_family("resolution", "")},
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
    offload: bool = field(
        default=False,
        metadata={
            "help": "keep the VAE and the text encoders on the CPU between steps, moved to the accelerator only "
            "to encode each batch (as diffusers' SD3/FLUX scripts' --offload); uncached runs: with "
            "--cache_latents they encode once, into the cache"
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    human_fraction: Optional[float] = field(
        default=None,
        metadata={
            "help": "dedpo: share of pairs that keep their human label (the rest use the judge's synthetic_label_0)"
        },
    )
    human_seed: int = field(default=0, metadata={"help": "dedpo: seed of which pairs keep their human label"})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "read the pairs as they are needed instead of opening the whole split (datasets' streaming): "
            "a Hub id, or a local folder or file of parquet or webdataset .tar shards; shuffled by blocks of "
            "--shuffle_buffer_size rows, resumed exactly; needs --max_train_steps; not with --cache_latents, "
            "--loss_type dedpo, --flip_rate or --max_train_samples (docs/data.md)"
        },
    )
    shuffle_buffer_size: int = field(
        default=data.DEFAULT_BUFFER_SIZE,
        metadata={
            "help": "--streaming: rows per shuffle block (read, permuted with a seed of --seed, served); the "
            "shard order is shuffled every pass too; memory holds one block"
        },
    )


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
        metadata={
            "help": "a checkpoint folder of the run in --output_dir, or 'latest' (the newest usable one); the "
            "command must ask for the run's settings, but for the length, checkpointing, logging, validation "
            "and Hub flags (changes logged); another --learning_rate, objective, data, batch, model, rank or "
            "seed is refused"
        },
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
    validation_scorer: Optional[str] = field(
        default=None,
        metadata={
            "help": f"score the validation images with a reward model ({SCORER_CHOICES}, as fastpref eval's "
            "--metrics) and log their mean as validation/NAME (trackers and log); loaded once, on the main process"
        },
    )
    scorer_weights: List[str] = field(default_factory=list, metadata={"help": WEIGHTS_HELP})
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
    print_memory_plan: bool = field(
        default=False,
        metadata={
            "help": "print the bytes per GPU of each part of this run (policy, gradients, optimizer, reference, "
            "footprints, activations) under DDP and --fsdp, from the model's configs, and exit without training"
        },
    )
    local_rank: int = field(
        default=-1,
        metadata={"help": "accepted for torch.distributed launchers; accelerate reads the rank from the environment"},
    )


# TrainConfig and RunArguments fields whose command-line default depends on the run: not given,
# they are resolved from the model's family, the data or accelerate (what the help says).
RUN_DEFAULTS = {
    "beta": _per_family("beta", "the paper's "),
    "k1": _per_family("k1", "the paper's "),
    "max_train_steps": "--num_train_epochs over the data",
    "mixed_precision": "accelerate's configuration, else no",
    "tracker_name": " / ".join(f"{f.defaults.tracker_name} ({name})" for name, f in FAMILIES.items())
    + ", diffusers' names",
    "validation_inference_steps": f"{INFERENCE_STEPS} ({TURBO_STEPS} with --is_turbo), as diffusers",
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
    "beta": "the Adaptive-DPO paper's value for this model family",
    "lora_rank": "the Adaptive-DPO paper's rank",
    "learning_rate": "the Adaptive-DPO paper's rate",
    "lr_warmup_steps": "diffusers' own README commands pass 0",
    "seed": "diffusers leaves an unseeded run; fastpref's runs are reproducible",
    "dataset_split_name": "a run trains on the data set's training split unless told otherwise",
}


def defaults_that_differ(values: dict, family: ModelFamily, given: Optional[Set[str]] = None) -> List[str]:
    """One line per :data:`DIFFUSERS_DEFAULTS` flag left to a fastpref default other than
    diffusers'. ``values``: the parsed fields (of any of the three dataclasses); ``family``: the
    run's model family (its defaults stand in for the :data:`RUN_DEFAULTS` left unset); ``given``:
    the flags the command line sets (:func:`given_flags`; ``None``: the values that differ from
    their field's default count as given)."""
    fields = {f.name: f for group in (DataArguments, TrainConfig, RunArguments) for f in dataclasses.fields(group)}
    if given is None:
        given = {name for name in DIFFUSERS_DEFAULTS if values[name] not in (None, fields[name].default)}
    lines = []
    for name, theirs in DIFFUSERS_DEFAULTS.items():
        if name in given:
            continue
        ours = getattr(family.defaults, name) if values[name] is None else values[name]
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
        f"of {' / '.join(family.title for family in FAMILIES.values())}.",
    )
    parser.set_defaults(**dict.fromkeys(RUN_DEFAULTS))
    for action in parser._actions:
        if action.dest in RUN_DEFAULTS:
            action.help = f"{action.help}; fastpref train's default: {RUN_DEFAULTS[action.dest]}"
    return parser


def parse_args(argv=None, parser=None) -> Tuple[DataArguments, dict, RunArguments]:
    """``(data, settings, run)``: ``settings`` are the TrainConfig fields as given (``None`` for
    the :data:`RUN_DEFAULTS` not given); :func:`fastpref.train.run.resolve` checks and resolves
    them."""
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
