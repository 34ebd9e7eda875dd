"""The parts of a ``fastpref train`` run, built from its :class:`~fastpref.train.run.RunPlan`:
the accelerator, the data (pixels or the latent cache, and the batch encoder), the step count,
the trainer around the family's denoiser, and the data loader."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from . import data
from .checkpoints import install_lora_hooks
from .config import TrainConfig
from .latent_cache import LatentCache
from .trainer import PreferenceTrainer

logger = logging.getLogger("fastpref.train")


def make_accelerator(run, mixed_precision: Optional[str]):
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
    """The dtype of the frozen weights (encoders, a LoRA run's base denoiser): the mixed precision's."""
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


def open_pairs(plan, accelerator) -> data.PreferenceDataset:
    """The preference pairs of ``--dataset_name`` as the flags ask (on the main process first:
    one process converts or downloads, the others reuse it); ``--seed`` draws the
    ``--max_train_samples`` subset and the random crops and flips."""
    args, seed = plan.data, plan.config.seed
    dataset_kwargs = dict(
        split=args.dataset_split_name,
        cache_dir=args.cache_dir,
        keep_ties=args.keep_ties,
        flip_rate=args.flip_rate,
        flip_seed=args.flip_seed,
        max_pairs=args.max_train_samples,
        subset_seed=seed,
        hflip=not args.no_hflip and not args.cache_latents,
        random_crop=args.random_crop,
        augment_seed=seed,
        caption_column=args.caption_column,
        image_columns=(args.image_column_0, args.image_column_1),
        label_column=args.label_column,
    )
    if plan.config.loss_type == "dedpo":
        dataset_kwargs.update(synthetic_labels=True, human_fraction=args.human_fraction, human_seed=args.human_seed)
    with accelerator.main_process_first():
        dataset = data.PreferenceDataset(args.dataset_name, plan.resolution, check_images=False, **dataset_kwargs)
    if len(dataset) == 0:
        raise ValueError(f"dataset_name: no usable pairs in {args.dataset_name} ({dataset.summary()})")
    return dataset


def load_data(plan, accelerator) -> TrainData:
    """Open the pairs (:func:`open_pairs`) and either encode them once into the latent cache
    (``--cache_latents``; the work split across processes) or load the family's encoders for
    every batch. Registers the count of rows skipped at fetch in the checkpoints."""

    args, family = plan.data, plan.family
    if args.streaming:
        return load_stream(plan, accelerator)
    dataset = open_pairs(plan, accelerator)
    if args.cache_latents and not args.no_hflip:
        logger.info("--cache_latents: images are encoded once, without random flips (as with --no_hflip)")
    vae = tokenizers = text_encoders = None
    if args.cache_latents:
        cache = LatentCache.build(
            dataset,
            args.latent_cache_dir,
            plan.source,
            family=family,
            dtype=weight_dtype(accelerator),
            device=accelerator.device,
            batch_size=args.vae_encode_batch_size,
            accelerator=accelerator,
        )
        train_set = cache.view(dataset)
        logger.info("latent cache %s: %s", "hit" if cache.hit else "built", cache.path)
    else:
        vae, tokenizers, text_encoders = family.load_encoders(
            plan.source, dtype=weight_dtype(accelerator), device="cpu" if args.offload else accelerator.device
        )
        train_set = dataset
    summary = getattr(train_set, "dataset", dataset).summary()  # the cache view knows the undecodable rows
    summary["undecodable_at_fetch"] = 0
    logger.info("data: %s", summary)
    judge = dataset.judge_agreement() if plan.config.loss_type == "dedpo" else None
    if judge is not None:
        logger.info(
            "judge vs human labels on the %d human-labelled pairs: accuracy %.3f, mean |p - y| %.3f",
            judge["num_labelled"],
            judge["accuracy"],
            judge["mean_abs_error"],
        )
    encode = batch_encoder(plan, accelerator, (vae, tokenizers, text_encoders), summary)
    return TrainData(train_set, encode, summary, judge)


def batch_encoder(plan, accelerator, encoders: tuple, summary: dict) -> data.BatchEncoder:
    """The :class:`~fastpref.train.data.BatchEncoder` of every batch, given ``(vae, tokenizers,
    text_encoders)`` (all ``None`` with ``--cache_latents``); rows skipped at fetch, in any
    process, are counted in ``summary["undecodable_at_fetch"]``."""
    from accelerate.utils import gather_object

    args = plan.data
    skips = data.FetchSkips()
    skips.install(accelerator)
    return data.BatchEncoder(
        plan.family,
        *encoders,
        plan.resolution,
        accelerator.device,
        vae_batch_size=args.vae_encode_batch_size,
        offload=args.offload and not args.cache_latents,
        skips=skips,
        summary=summary,
        gather=gather_object if accelerator.num_processes > 1 else None,
    )


def open_stream(plan, accelerator) -> data.PairStream:
    """``--streaming``: this process's :class:`~fastpref.train.data.PairStream` of
    ``--dataset_name`` (its share of the rows), ordered with ``--seed`` by blocks of
    ``--shuffle_buffer_size`` rows, ``--seed`` also drawing the random crops and flips."""
    args = plan.data
    return data.PairStream(
        args.dataset_name,
        plan.resolution,
        split=args.dataset_split_name,
        cache_dir=args.cache_dir,
        seed=plan.config.seed,
        buffer_size=args.shuffle_buffer_size,
        batch_size=plan.run.train_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        keep_ties=args.keep_ties,
        hflip=not args.no_hflip,
        random_crop=args.random_crop,
        caption_column=args.caption_column,
        image_columns=(args.image_column_0, args.image_column_1),
        label_column=args.label_column,
    )


def load_stream(plan, accelerator) -> TrainData:
    """``--streaming``: the stream (:func:`open_stream`; its position saved in every checkpoint
    and restored on resume) and the family's encoders for every batch. Rows skipped at fetch are
    counted as :func:`load_data` counts them."""

    args, family = plan.data, plan.family
    stream = open_stream(plan, accelerator)
    stream.install(accelerator)
    vae, tokenizers, text_encoders = family.load_encoders(
        plan.source, dtype=weight_dtype(accelerator), device="cpu" if args.offload else accelerator.device
    )
    summary = {**stream.summary(), "undecodable_at_fetch": 0}
    logger.info(
        "--streaming %s: %d %s file(s), shuffled by blocks of %d rows; process %d of %d",
        args.dataset_name,
        len(stream.files),
        stream.builder,
        stream.buffer_size,
        accelerator.process_index,
        accelerator.num_processes,
    )
    encode = batch_encoder(plan, accelerator, (vae, tokenizers, text_encoders), summary)
    return TrainData(stream, encode, summary, None)


def stream_batches(stream: data.PairStream, summary: dict, trainer: PreferenceTrainer):
    """``--streaming``: the stream's batches from where the trainer's step left it (the
    checkpoint restored the position), ``summary`` kept up to date with its counts (this
    process's). ``ValueError`` when the position does not match the step."""
    served, expected = stream.state["served"], trainer.micro_step * stream.batch_size
    if served != expected:
        raise ValueError(
            f"--streaming: the checkpoint's stream position ({served} pairs served) does not match its step "
            f"({trainer.micro_step} micro-steps of {stream.batch_size} pairs)"
        )
    for batch in stream:
        summary.update(stream.summary())
        yield batch


def run_config(plan, num_pairs: Optional[int], accelerator) -> TrainConfig:
    """The plan's :class:`TrainConfig` with what only the run knows: the step count from
    ``--num_train_epochs`` over ``num_pairs`` (unless ``--max_train_steps`` was given), the
    learning rate scaled by ``--scale_lr``, accelerate's mixed precision."""
    config, run, world = plan.config, plan.run, accelerator.num_processes
    steps = plan.settings["max_train_steps"]
    if steps is None:
        pairs_per_step = run.train_batch_size * world * config.gradient_accumulation_steps
        steps = run.num_train_epochs * max(1, math.ceil(num_pairs / pairs_per_step))
    rate = config.learning_rate
    if run.scale_lr:
        rate *= run.train_batch_size * config.gradient_accumulation_steps * world
    return config.for_run(max_train_steps=steps, learning_rate=rate, mixed_precision=accelerator.mixed_precision)


def build_trainer(plan, config: TrainConfig, accelerator, num_pairs=None) -> PreferenceTrainer:
    """The family's denoiser and noise schedule in a :class:`PreferenceTrainer` (``--is_turbo``:
    the turbo schedule; xformers attention on request); a LoRA run checkpoints its adapter only,
    plus a copy in diffusers' LoRA format. ``num_pairs`` (the data's) sets the epoch length that
    ``--footprint_recipe authors`` restarts the metric warm-up at."""
    family = plan.family
    # LoRA keeps the frozen base in the mixed-precision dtype; a full fine-tune trains float32 weights
    denoiser = family.load_denoiser(plan.source, weight_dtype(accelerator) if config.lora_rank > 0 else torch.float32)
    if plan.run.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()
    noise_scheduler = family.load_noise_scheduler(plan.source, is_turbo=config.is_turbo)
    global_batch = plan.run.train_batch_size * accelerator.num_processes
    per_epoch = None if num_pairs is None else math.ceil(num_pairs / global_batch)
    trainer = PreferenceTrainer(
        denoiser, noise_scheduler, config, accelerator, family=family, micro_steps_per_epoch=per_epoch
    )
    if config.lora_rank > 0:
        install_lora_hooks(accelerator, type(trainer.base_unet), family)
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
