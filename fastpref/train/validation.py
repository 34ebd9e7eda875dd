"""Validation images (``--run_validation``): the run's own denoiser, LoRA applied, in its family's
diffusers pipeline, samples a few prompts with a fixed seed; the images go to the trackers
(TensorBoard, wandb) and to ``OUTPUT_DIR/validation/step-N/``. With ``--validation_scorer`` a
reward model of :mod:`fastpref.scorers` scores them and their mean is logged as
``validation/NAME``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence

import torch

logger = logging.getLogger("fastpref.train")

# Short prompts in the spirit of diffusers' DPO scripts' list (a portrait, a painting, a scene).
VALIDATION_PROMPTS = (
    "portrait photo of an old fisherman, golden hour, shallow depth of field, highly detailed",
    "oil painting of a cyborg with copper hair, dramatic light",
    "an astronaut in a jungle, muted cold colors, detailed",
    "a red fox on a snowy hill at sunrise, photograph",
)
FOLDER = "validation"
TRACKER_KEY = "validation"


def build_pipeline(source, family, denoiser, weight_dtype: torch.dtype, device):
    """The family's text-to-image pipeline around ``denoiser`` (the policy being trained,
    adapters as they are), the other parts from ``source``
    (:class:`~fastpref.train.models.ModelSource`), on ``device``, without a progress bar."""
    pipeline = family.validation_pipeline(source, denoiser, weight_dtype, device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def sample(pipeline, prompts: Sequence[str], resolution: int, seed: int, autocast, **call) -> list:
    """One PIL image per prompt, each from a generator seeded with ``seed`` (the same images for
    the same weights) under ``autocast()``; ``call``: the family's ``sampling`` arguments."""
    images = []
    for prompt in prompts:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with autocast():
            image = pipeline(prompt, height=resolution, width=resolution, generator=generator, **call).images[0]
        images.append(image)
    return images


def save_images(images: list, folder: Path) -> List[Path]:
    """``00.png``, ``01.png``... in ``folder`` (made if needed), in prompt order."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, image in enumerate(images):
        files.append(folder / f"{index:02d}.png")
        image.save(files[-1])
    return files


def log_images(trackers, images: list, prompts: Sequence[str], step: int) -> None:
    """The images to each tracker that takes images: TensorBoard (one ``NHWC`` batch under
    ``validation``) and wandb (captioned with their prompts)."""
    import numpy as np

    for tracker in trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images(TRACKER_KEY, batch, step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            captioned = [wandb.Image(image, caption=f"{i}: {p}") for i, (image, p) in enumerate(zip(images, prompts))]
            tracker.log({TRACKER_KEY: captioned}, step=step)


def load_scorer(run, device, dtype: torch.dtype):
    """The reward model of ``--validation_scorer`` (weights: its ``--scorer_weights``, else the
    Hub's) on ``device`` in ``dtype``, or ``None`` without the flag or ``--run_validation``.
    Call it once per run, on the main process."""
    if run.validation_scorer is None or not run.run_validation:
        return None
    from fastpref.scorers import make_scorer
    from fastpref.scorers.flags import parse_weights

    weights = parse_weights(run.scorer_weights).get(run.validation_scorer)
    try:
        scorer = make_scorer(run.validation_scorer, weights, device, dtype)
    except OSError as error:  # transformers' "not a local folder and not a valid model identifier"
        raise FileNotFoundError(f"--validation_scorer {run.validation_scorer}: cannot load its weights: {error}")
    logger.info("validation images scored by %s (%s): %s", scorer.title, scorer.scale, scorer.sources)
    return scorer


def log_score(trackers, scorer, images: list, prompts: Sequence[str], step: int) -> float:
    """The mean score of ``images`` by ``scorer``, logged as ``validation/NAME`` to the trackers
    and the log; returns it."""
    value = float(scorer.score(images, prompts).mean())
    for tracker in trackers:
        tracker.log({f"{TRACKER_KEY}/{scorer.name}": value}, step=step)
    logger.info("validation at step %d: %s %.6g (mean of %d images)", step, scorer.name, value, len(images))
    return value


def samples_here(accelerator, trainer) -> bool:
    """Whether this process takes part in validation: the main process, or under ``--fsdp`` every
    process (a sharded denoiser's forward needs them all; :func:`sample_sharded`)."""
    return accelerator.is_main_process or getattr(trainer, "sharded", False)


def run_validation(trainer, source, run, resolution: int, output_dir: Path, scorer=None) -> List[Path]:
    """Sample ``run.validation_prompts`` with the trainer's current policy at its step, log the
    images (and their mean ``scorer`` score, when given) and save them to
    ``output_dir/validation/step-N/``; the main process only, or under ``--fsdp`` every process
    (:func:`sample_sharded`; the main process logs and saves, the others return ``[]``). The UNet is
    put back in training mode afterwards."""
    accelerator, config = trainer.accelerator, trainer.config
    step = trainer.global_step
    logger.info("validation at step %d: %d prompts", step, len(run.validation_prompts))
    unet = trainer.base_unet
    unet.eval()
    try:
        pipeline = build_pipeline(source, trainer.family, unet, trainer.weight_dtype, accelerator.device)
        call = trainer.family.sampling(config.is_turbo, run.validation_inference_steps)
        if getattr(trainer, "sharded", False):
            images = sample_sharded(pipeline, run.validation_prompts, resolution, config.seed, accelerator, **call)
        else:
            images = sample(pipeline, run.validation_prompts, resolution, config.seed, accelerator.autocast, **call)
    finally:
        unet.train()
    del pipeline
    if not accelerator.is_main_process:
        return []
    files = save_images(images, output_dir / FOLDER / f"step-{step}")
    log_images(accelerator.trackers, images, run.validation_prompts, step)
    if scorer is not None:
        log_score(accelerator.trackers, scorer, images, run.validation_prompts, step)
    return files


def sample_sharded(pipeline, prompts: Sequence[str], resolution: int, seed: int, accelerator, **call) -> list:
    """:func:`sample` with a ``--fsdp`` denoiser: each of its forwards gathers its blocks from every
    process, so every process samples in step -- process r the prompts r, r + W, ... (W
    processes; a process out of prompts samples the first one again and drops it) -- and the
    images are gathered in prompt order; each prompt's generator is seeded with ``seed``, as in
    :func:`sample`. No process gathers the whole denoiser, only FSDP's units (blocks) in turn;
    those left gathered after the last forward are freed (``reshard``) when sampling ends."""
    from accelerate.utils import gather_object
    from torch.distributed.fsdp import FSDPModule

    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = -(-len(prompts) // world)
    mine = [prompts[i] if i < len(prompts) else prompts[0] for i in range(rank, rounds * world, world)]
    images = sample(pipeline, mine, resolution, seed, accelerator.autocast, **call)
    for module in pipeline.components.values():  # the blocks kept gathered after the last forward
        for part in module.modules() if isinstance(module, torch.nn.Module) else ():
            if isinstance(part, FSDPModule):
                part.reshard()
    every = gather_object([(i, image) for i, image in zip(range(rank, rounds * world, world), images)])
    return [image for i, image in sorted(every, key=lambda pair: pair[0]) if i < len(prompts)]
