"""Validation images (``--run_validation``): the run's own UNet, LoRA applied, in a diffusers
pipeline, samples a few prompts with a fixed seed; the images go to the trackers (TensorBoard,
wandb) and to ``OUTPUT_DIR/validation/step-N/``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import torch

logger = logging.getLogger("fastpref.train")

# Short prompts in the spirit of diffusers' DPO scripts' list (a portrait, a painting, a scene).
VALIDATION_PROMPTS = (
    "portrait photo of an old fisherman, golden hour, shallow depth of field, highly detailed",
    "oil painting of a cyborg with copper hair, dramatic light",
    "an astronaut in a jungle, muted cold colors, detailed",
    "a red fox on a snowy hill at sunrise, photograph",
)
INFERENCE_STEPS = 25  # diffusers' DPO scripts sample validation images with 25 steps
TURBO_INFERENCE_STEPS = 4  # and SDXL Turbo with 4, without guidance
GUIDANCE_SCALE = {"sd15": 7.5, "sdxl": 5.0}  # the SD pipeline's default; the SDXL script's
FOLDER = "validation"
TRACKER_KEY = "validation"


def sampling(arch: str, is_turbo: bool, steps: Optional[int]) -> dict:
    """``num_inference_steps`` and ``guidance_scale`` of the validation pipeline call."""
    if is_turbo:
        return dict(num_inference_steps=steps or TURBO_INFERENCE_STEPS, guidance_scale=0.0)
    return dict(num_inference_steps=steps or INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE[arch])


def build_pipeline(source, unet, arch: str, weight_dtype: torch.dtype, device):
    """A diffusers text-to-image pipeline around ``unet`` (the policy being trained, adapters
    as they are): the other parts from ``source``
    (:class:`~fastpref.train.models.ModelSource`), the VAE in its
    :func:`~fastpref.train.models.vae_dtype`. SD 1.5 samples with ``DPMSolverMultistepScheduler``
    as diffusers' SD script, SDXL with its own scheduler as diffusers' SDXL script."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    parts = dict(unet=unet, vae=source.load_vae(arch, weight_dtype))
    if arch == "sd15":
        parts.update(safety_checker=None, requires_safety_checker=False)
    pipeline = pipeline_class.from_pretrained(
        source.path, revision=source.revision, variant=source.variant, torch_dtype=weight_dtype, **parts
    )
    if arch == "sd15":
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def sample(pipeline, prompts: Sequence[str], resolution: int, seed: int, autocast, **call) -> list:
    """One PIL image per prompt, each from a generator seeded with ``seed`` (the same images for
    the same weights) under ``autocast()``; ``call``: :func:`sampling`'s arguments."""
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


def run_validation(trainer, source, arch: str, run, resolution: int, output_dir: Path) -> List[Path]:
    """Sample ``run.validation_prompts`` with the trainer's current policy at its step, log the
    images and save them to ``output_dir/validation/step-N/``; main process only. The UNet is
    put back in training mode afterwards."""
    accelerator, config = trainer.accelerator, trainer.config
    step = trainer.global_step
    logger.info("validation at step %d: %d prompts", step, len(run.validation_prompts))
    unet = trainer.base_unet
    unet.eval()
    try:
        pipeline = build_pipeline(source, unet, arch, trainer.weight_dtype, accelerator.device)
        call = sampling(arch, config.is_turbo, run.validation_inference_steps)
        images = sample(pipeline, run.validation_prompts, resolution, config.seed, accelerator.autocast, **call)
    finally:
        unet.train()
    files = save_images(images, output_dir / FOLDER / f"step-{step}")
    log_images(accelerator.trackers, images, run.validation_prompts, step)
    del pipeline
    return files
