"""``fastpref eval``'s flags, :class:`EvalArguments` (default, choices and help written once),
parsed with ``transformers.HfArgumentParser`` as ``fastpref train``'s."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Dict, List, Literal, Optional

from fastpref.scorers import SCORERS
from fastpref.scorers.flags import CHOICES, WEIGHTS_HELP, parse_weights

from .prompts import NAMED_SETS

#: the scorers that need no extra beyond ``fastpref[train]``
DEFAULT_METRICS = ["pickscore", "aesthetic", "clip"]


class ArgumentError(ValueError):
    """A bad ``fastpref eval`` argument; the message starts with the flag."""


@dataclasses.dataclass
class EvalArguments:
    """What to compare, on which prompts, with which reward models."""

    pretrained_model_name_or_path: str = field(
        metadata={"help": "the base diffusers pipeline (local folder or Hub id) the trained outputs were tuned from"}
    )
    output_dir: str = field(
        metadata={
            "help": "where images, scores, eval.json, eval.md, grids and plots go; a rerun resumes there and a "
            "new model reuses the base's images"
        }
    )
    prompts: str = field(
        metadata={
            "help": "a .txt file (one prompt a line), a .json list, a datasets source (Hub id, Hub-layout folder, "
            "parquet, save_to_disk; see --prompt_split, --caption_column) or a named set: "
            + ", ".join(f"{name} ({named.description}, {named.repo})" for name, named in NAMED_SETS.items())
        }
    )
    models: List[str] = field(
        default_factory=list,
        metadata={
            "help": "trained outputs, PATH or NAME=PATH: a fastpref train --output_dir (LoRA "
            "pytorch_lora_weights.safetensors, or a full fine-tune's unet/), or one of its checkpoint-N folders"
        },
    )
    metrics: List[str] = field(default_factory=lambda: list(DEFAULT_METRICS), metadata={"help": f"scorers: {CHOICES}"})
    scorer_weights: List[str] = field(default_factory=list, metadata={"help": WEIGHTS_HELP})
    seeds: List[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "the seeds of every prompt, the same for every model (paired comparison)"},
    )
    max_prompts: Optional[int] = field(default=None, metadata={"help": "only the first N prompts"})
    prompt_split: str = field(default="train", metadata={"help": "the split of a datasets --prompts source"})
    caption_column: str = field(
        default="caption", metadata={"help": "the prompt column of a datasets source or key of JSON objects"}
    )
    prompt_set_path: Optional[str] = field(
        default=None, metadata={"help": "a local copy of a named --prompts set, in its Hub repository's layout"}
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "the Hugging Face datasets / Hub cache"})
    revision: Optional[str] = field(default=None, metadata={"help": "revision of the base pipeline on the Hub"})
    variant: Optional[str] = field(default=None, metadata={"help": "weight variant of the base pipeline (fp16)"})
    resolution: Optional[int] = field(default=None, metadata={"help": "image size; default: the family's (512 SD 1.5)"})
    num_inference_steps: Optional[int] = field(
        default=None, metadata={"help": "sampling steps; default: the family's validation steps (25)"}
    )
    guidance_scale: Optional[float] = field(
        default=None, metadata={"help": "classifier-free guidance; default: the family's pipeline default (7.5)"}
    )
    batch_size: int = field(default=4, metadata={"help": "images per pipeline call and per scorer call"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "weights and autocast dtype of generation and scoring"}
    )
    grid_prompts: int = field(default=8, metadata={"help": "prompts in each base-vs-model image grid (0: no grids)"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})


def scorer_weights(values: List[str]) -> Dict[str, Dict[str, str]]:
    """``--scorer_weights`` as ``{metric: {role: path}}``; ``ArgumentError`` for a malformed one."""
    try:
        return parse_weights(values)
    except ValueError as error:
        raise ArgumentError(str(error)) from None


def check(args: EvalArguments) -> None:
    """Every argument check, run once before any work; ``ArgumentError`` names the flag."""
    unknown = [name for name in args.metrics if name not in SCORERS]
    if unknown:
        raise ArgumentError(f"--metrics: unknown metric {unknown[0]!r}; choices: {CHOICES}")
    if len(set(args.metrics)) != len(args.metrics):
        raise ArgumentError("--metrics: a metric is named twice")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ArgumentError(f"--seeds: need distinct seeds, got {args.seeds}")
    for flag in ("batch_size", "max_prompts", "resolution", "num_inference_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ArgumentError(f"--{flag}: must be >= 1, got {value}")
    if args.resolution is not None and args.resolution % 8:
        raise ArgumentError(f"--resolution: must be a multiple of 8, got {args.resolution}")
    if args.grid_prompts < 0:
        raise ArgumentError(f"--grid_prompts: must be >= 0, got {args.grid_prompts}")
    scorer_weights(args.scorer_weights)


def build_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(
        EvalArguments,
        prog="fastpref eval",
        description="Generate images of a prompt set with the base pipeline and trained outputs (same seeds), "
        "score them with reward models and compare each with the base (paired differences, win rates).",
    )
