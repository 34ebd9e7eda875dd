"""One evaluation, start to end: resolve the prompts, models and scorers once; generate the
images of every model (each process its shard of (prompt, seed)); score them; then, on the main
process, the statistics, ``eval.json``, ``eval.md``, grids and plots."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import List

import torch

from fastpref.files import write_json_atomic, write_text_atomic
from fastpref.scorers import make_scorer, scorer_class

from . import candidates as cands
from .arguments import EvalArguments, scorer_weights
from .generation import generate, items, shard
from .grids import write_grids
from .prompts import load_prompts
from .report import markdown
from .scoring import read_scores, score_images
from .statistics import LEVEL, compare
from .store import check_settings, claim

logger = logging.getLogger("fastpref.evaluate")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Plan:
    """An evaluation resolved from its arguments: what ``evaluate`` runs."""

    args: EvalArguments
    source: object  # fastpref.train.models.ModelSource
    family: object  # fastpref.train.families.base.ModelFamily
    prompts: List[str]
    models: List[cands.Candidate]
    weights: dict
    resolution: int
    call: dict


def resolve(args: EvalArguments) -> Plan:
    """Read the base's family, the prompts and the models; ``ValueError`` / ``FileNotFoundError``
    naming the flag before any model is loaded."""
    from fastpref.train.models import ModelSource

    source = ModelSource(args.pretrained_model_name_or_path, args.revision, args.variant)
    family = source.family
    prompts = load_prompts(
        args.prompts, args.prompt_split, args.caption_column, args.max_prompts, args.prompt_set_path, args.cache_dir
    )
    models = cands.candidates(args.models, family.denoiser_folder)
    call = family.sampling(False, args.num_inference_steps)
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    weights = scorer_weights(args.scorer_weights)
    for name in args.metrics:
        scorer_class(name).check_installed()  # a missing extra fails now, not after the images
    resolution = args.resolution or family.defaults.resolution
    return Plan(args, source, family, prompts, models, weights, resolution, call)


def generation_settings(plan: Plan, model: cands.Candidate) -> dict:
    return {
        "base": plan.source.path,
        "revision": plan.source.revision,
        "variant": plan.source.variant,
        "model": model.path,
        "kind": model.kind,
        "resolution": plan.resolution,
        "mixed_precision": plan.args.mixed_precision,
        **plan.call,
    }


def folders(plan: Plan):
    """``(folder, settings, what)`` of every model's images and every metric's scores."""
    out = Path(plan.args.output_dir)
    for model in plan.models:
        yield out / "images" / model.name, generation_settings(plan, model), "images"
    for metric in plan.args.metrics:
        weights = {**scorer_class(metric).weights, **plan.weights.get(metric, {})}
        yield out / "scores" / metric, {"weights": weights}, "scores"


def prepare_folders(plan: Plan, accelerator) -> None:
    """Before any work: every process checks that no folder holds files made with other settings
    (so that all fail alike, none waits for a failed one); then the main process makes the
    folders, clears a killed run's temporary files and records the settings."""
    for folder, settings, what in folders(plan):
        check_settings(folder, settings, what)
    if accelerator.is_main_process:
        for folder, settings, _ in folders(plan):
            claim(folder, settings)
    accelerator.wait_for_everyone()


def evaluate(plan: Plan) -> dict:
    """Run ``plan``; returns the ``eval.json`` dictionary on the main process (which writes the
    reports), None on the others."""
    from accelerate import Accelerator

    args = plan.args
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    out = Path(args.output_dir)
    progress = accelerator.is_local_main_process and not args.no_progress
    dtype = DTYPES[args.mixed_precision]
    work = items(plan.prompts, args.seeds)
    mine = shard(work, accelerator.process_index, accelerator.num_processes)
    names = [model.name for model in plan.models]

    prepare_folders(plan, accelerator)
    for model in plan.models:

        def make_pipeline(model=model):
            return cands.build_pipeline(model, plan.source, plan.family, dtype, accelerator.device)

        made = generate(
            make_pipeline,
            out,
            model.name,
            mine,
            resolution=plan.resolution,
            batch_size=args.batch_size,
            autocast=accelerator.autocast,
            call=plan.call,
            progress=progress,
        )
        logger.info("%s: %d images made, %d already there", model.name, made, len(mine) - made)
    accelerator.wait_for_everyone()

    for metric in args.metrics:
        weights = plan.weights.get(metric, {})

        def load_scorer(metric=metric, weights=weights):
            return make_scorer(metric, weights, accelerator.device, dtype)

        score_images(load_scorer, out, metric, names, mine, batch_size=args.batch_size, progress=progress)
    accelerator.wait_for_everyone()

    results = None
    if accelerator.is_main_process:
        results = summarize(plan)
        write_reports(plan, results)
    accelerator.wait_for_everyone()
    return results


def summarize(plan: Plan) -> dict:
    """The ``eval.json`` dictionary, from the score files."""
    args = plan.args
    names = [model.name for model in plan.models]
    metrics = {}
    for metric in args.metrics:
        scorer = scorer_class(metric)
        scores = read_scores(args.output_dir, metric, names, plan.prompts, args.seeds)
        metrics[metric] = {
            "title": scorer.title,
            "scale": scorer.scale,
            "reference": scorer.reference,
            "weights": {**scorer.weights, **plan.weights.get(metric, {})},
            "models": compare(scores, cands.BASE, LEVEL),
            "scores": {name: values.tolist() for name, values in scores.items()},
        }
    return {
        "base": plan.source.path,
        "models": [dataclasses.asdict(model) for model in plan.models],
        "prompts": {"source": args.prompts, "split": args.prompt_split, "list": plan.prompts},
        "seeds": list(args.seeds),
        "num_prompts": len(plan.prompts),
        "num_seeds": len(args.seeds),
        "level": LEVEL,
        "generation": {
            "family": plan.family.name,
            "resolution": plan.resolution,
            "mixed_precision": args.mixed_precision,
            **plan.call,
        },
        "metrics": metrics,
    }


def write_reports(plan: Plan, results: dict) -> None:
    """Grids and plots, then ``eval.json`` and ``eval.md`` (printed)."""
    from . import plots

    out = Path(plan.args.output_dir)
    grid_items = items(plan.prompts[: plan.args.grid_prompts], plan.args.seeds[:1])
    tuned = [model.name for model in plan.models[1:]]
    results["grid_prompts"] = plan.prompts[: plan.args.grid_prompts]
    results["grids"] = write_grids(out, cands.BASE, tuned, grid_items) if grid_items else []
    if plots.available():
        results["plots"] = plots.write_plots(results, out)
    else:
        results["plots"] = []
        logger.warning("no plots: matplotlib is not installed (pip install 'fastpref[demo]')")
    write_json_atomic(out / "eval.json", results)
    text = markdown(results)
    write_text_atomic(out / "eval.md", text)
    print(text)
