"""``fastpref train``: Diffusion-DPO / Adaptive-DPO fine-tuning of SD 1.5 and SDXL on Pick-a-Pic data.

    fastpref train --pretrained_model_name_or_path MODEL --dataset_name DATA --output_dir OUT [...]
    accelerate launch -m fastpref.train ...          # several processes (DDP)

Flags follow diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
where the concept is the same (``--beta_dpo`` has the same scale there and here). The loop:
load the pipeline folder (SDXL is detected from it), read the parquet data
(:class:`fastpref.train.data.PreferenceDataset`: winner first, ties dropped unless ``--keep_ties``,
seeded ``--flip_rate`` flips, bad rows skipped and counted), optionally encode it once into a
latent cache (``--cache_latents``), and run :class:`fastpref.train.trainer.PreferenceTrainer` for
``--max_train_steps`` optimizer steps. Outputs in ``--output_dir``:

- ``pytorch_lora_weights.safetensors`` (LoRA; ``pipe.load_lora_weights(output_dir)`` loads it)
  or ``unet/`` (full fine-tune, safetensors);
- ``checkpoint-N/`` every ``--checkpointing_steps`` steps and at the end (accelerate state:
  weights, optimizer, LR schedule, RNG; plus the trainer's counters and EMA footprints). Each
  is written to ``checkpoint-N.partial`` and renamed when complete, so a run killed mid-save
  leaves the previous checkpoint intact. ``--resume_from_checkpoint latest`` continues bit for
  bit (the data order and the noise are functions of the step);
- ``logs/`` (TensorBoard with ``--report_to tensorboard``) and ``train_log.jsonl`` (one line per
  optimizer step): loss, implicit accuracy, mean u, W, Gamma, u on flipped vs kept pairs, LR,
  skipped steps; ``train_summary.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

logger = logging.getLogger("fastpref.train")

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_CACHE = Path(os.environ.get("FASTPREF_CACHE", Path.home() / ".cache" / "fastpref")) / "latents"
# The paper's per-architecture settings (Adaptive-DPO, SD1.5 / SDXL), used when not given.
ARCH_DEFAULTS = {"sd15": {"beta_dpo": 1000.0, "k1": 10.0}, "sdxl": {"beta_dpo": 2500.0, "k1": 1.0}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastpref train",
        description="Preference fine-tuning (Diffusion-DPO, Adaptive-DPO, IPO, robust DPO, cDPO, SFT, DeDPO) of SD 1.5 / SDXL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument_group("model and data")
    a.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="local diffusers pipeline folder (or a hub id where the hub is reachable); SDXL is detected from it",
    )
    a.add_argument(
        "--dataset_name",
        required=True,
        help="a parquet file or a folder of *.parquet in the Pick-a-Pic v2 schema (caption, jpg_0, jpg_1, label_0)",
    )
    a.add_argument("--output_dir", required=True, help="where weights, checkpoints and logs go")
    a.add_argument(
        "--resolution", type=int, default=None, help="training resolution in pixels; default 512 (sd15) / 1024 (sdxl)"
    )
    a.add_argument("--max_train_samples", type=int, default=None, help="use only the first N valid pairs")
    a.add_argument("--keep_ties", action="store_true", help="keep pairs with label_0 == 0.5 (dropped by default)")
    a.add_argument(
        "--flip_rate",
        type=float,
        default=0.0,
        help="flip the labels of this share of pairs (a seeded random subset), to study label noise",
    )
    a.add_argument("--flip_seed", type=int, default=0, help="seed of the flipped subset")
    a.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode VAE latents and text embeddings once (reused across runs and resumes)",
    )
    a.add_argument(
        "--cache_dir", default=str(DEFAULT_CACHE), help="where the latent cache lives ($FASTPREF_CACHE/latents)"
    )
    a.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")
    a.add_argument(
        "--human_fraction",
        type=float,
        default=None,
        help="dedpo: share of pairs that keep their human label (the rest use the judge's synthetic_label_0)",
    )
    a.add_argument("--human_seed", type=int, default=0, help="dedpo: seed of which pairs keep their human label")

    t = p.add_argument_group("optimization")
    t.add_argument("--train_batch_size", type=int, default=4, help="pairs per process per micro-step")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    t.add_argument(
        "--max_train_steps", type=int, default=None, help="optimizer steps; default: --num_train_epochs over the data"
    )
    t.add_argument("--num_train_epochs", type=int, default=1, help="epochs, when --max_train_steps is not given")
    t.add_argument("--learning_rate", type=float, default=1e-5, help="peak learning rate")
    t.add_argument(
        "--scale_lr", action="store_true", help="multiply the learning rate by batch size x accumulation x processes"
    )
    t.add_argument(
        "--lr_scheduler",
        default="constant",
        help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
    )
    t.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps of the LR schedule")
    t.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    t.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    t.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    t.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    t.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    t.add_argument(
        "--lora_rank", type=int, default=8, help="LoRA rank on the attention projections; 0 = full fine-tune"
    )
    t.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="default: accelerate's configuration, else no",
    )
    t.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for UNet activation memory")
    t.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and noise")

    l = p.add_argument_group("loss")  # noqa: E741
    l.add_argument(
        "--loss_type",
        default="adaptive",
        choices=["dpo", "adaptive", "ipo", "adaptive-ipo", "robust", "cdpo", "hinge", "sft", "dedpo"],
        help="the objective",
    )
    l.add_argument(
        "--beta_dpo",
        type=float,
        default=None,
        help="beta, diffusers' scale (z = beta * difference of per-sample mean squared errors); default 1000 (sd15) / 2500 (sdxl), the paper's",
    )
    l.add_argument("--rho", type=float, default=15.0, help="scale of l inside the metric u")
    l.add_argument("--k1", type=float, default=None, help="weight strength; default 10 (sd15) / 1 (sdxl), the paper's")
    l.add_argument("--k2", type=float, default=None, help="margin slope; default -1/beta")
    l.add_argument("--c2", type=float, default=None, help="margin offset; default the detached batch mean of l")
    l.add_argument("--ipo_tau", type=float, default=None, help="tau of the IPO heads; default beta")
    l.add_argument(
        "--weighting",
        default=None,
        choices=["linear", "square", "sqrt", "sigmoid", "none"],
        help="W; default linear for the adaptive types, none otherwise",
    )
    l.add_argument(
        "--margin",
        default=None,
        choices=["quadratic", "linear", "none"],
        help="Gamma; default quadratic for the adaptive types, none otherwise",
    )
    l.add_argument(
        "--metric_preset",
        default="official",
        choices=["official", "paper"],
        help="u as the authors' code (official) or as the paper's equations print it",
    )
    l.add_argument(
        "--label_noise", "--eps", dest="eps", type=float, default=0.1, help="noise rate of robust / smoothing of cdpo"
    )
    l.add_argument(
        "--ema_decays", default="0.9999,0.5", help="comma-separated decays of the EMA footprints (the authors')"
    )
    l.add_argument(
        "--metric_warmup_steps",
        type=int,
        default=None,
        help="micro-steps with u := 0 (default 2 x gradient_accumulation_steps, the authors')",
    )
    l.add_argument(
        "--global_metric",
        action="store_true",
        help="u's batch statistics over the global batch of all processes (default: per process, as the authors)",
    )
    l.add_argument(
        "--loss_backend", default="auto", choices=["auto", "triton", "cpp", "torch"], help="fastpref loss backend"
    )
    l.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=10,
        help="abort (after saving a checkpoint) after this many non-finite steps in a row",
    )

    o = p.add_argument_group("checkpoints and logs")
    o.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N optimizer steps")
    o.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    o.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output_dir")
    o.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    o.add_argument("--logging_dir", default="logs", help="TensorBoard folder inside --output_dir")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def checkpoints(output_dir) -> List[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    found = [
        (int(m.group(1)), d)
        for d in Path(output_dir).glob("checkpoint-*")
        if (m := CHECKPOINT.match(d.name)) and d.is_dir()
    ]
    return [d for _, d in sorted(found)]


def resolve_resume(value: Optional[str], output_dir) -> Optional[Path]:
    if not value:
        return None
    if value == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not path.is_dir():
        path = Path(output_dir) / value
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} is not a checkpoint folder")
    return path


def save_checkpoint(accelerator, output_dir, step: int, total_limit: Optional[int]) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>.partial``, then renamed."""
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def install_lora_hooks(accelerator, unet_type) -> None:
    """Checkpoints of a LoRA run hold the policy adapter only (not the frozen base UNet)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models:
            if not isinstance(model, unet_type):
                raise ValueError(f"unexpected model in the checkpoint: {type(model).__name__}")
            if accelerator.is_main_process:
                state = {
                    k: v.detach().cpu().contiguous()
                    for k, v in get_peft_model_state_dict(model, adapter_name="default").items()
                }
                save_file(state, os.path.join(output_dir, "policy_lora.safetensors"))
            if weights:
                weights.pop()  # accelerate must not also save the whole (frozen) UNet

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            if isinstance(model, unet_type):
                state = load_file(os.path.join(input_dir, "policy_lora.safetensors"))
                result = set_peft_model_state_dict(model, state, adapter_name="default")
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"checkpoint LoRA keys do not match the model: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class ShardSampler(torch.utils.data.Sampler):
    """This process's share of a global stream: global micro-batch ``g`` is positions
    ``[g*P*B, (g+1)*P*B)`` of the :class:`fastpref.train.data.PairSampler`; process ``p`` takes
    ``[p*B, (p+1)*B)`` of it. One process with batch ``P*B`` sees the same pairs in the same order."""

    def __init__(self, sampler, batch_size: int, num_processes: int, process_index: int):
        self.sampler, self.batch_size = sampler, batch_size
        self.num_processes, self.process_index = num_processes, process_index

    def __iter__(self):
        chunk = self.batch_size * self.num_processes
        lo, hi = self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size
        for position, index in enumerate(self.sampler):
            if lo <= position % chunk < hi:
                yield index


def time_ids(batch: dict, resolution: int) -> torch.Tensor:
    """SDXL ``add_time_ids [2B, 6]``: (original h, w, crop top, left, target h, w) per image."""
    target = torch.tensor([resolution, resolution], dtype=torch.int64).expand(batch["original_sizes"].shape[0], 2)
    return torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=-1).float()


class Encoder:
    """Turns a collated batch (pixels and captions, or cached latents and embeddings) into the
    trainer's batch (:mod:`fastpref.train.trainer`)."""

    def __init__(self, vae, tokenizers, text_encoders, resolution: int, device):
        self.vae, self.tokenizers, self.text_encoders = vae, tokenizers, text_encoders
        self.resolution, self.device = resolution, device

    def __call__(self, batch: dict) -> dict:
        from .data import encode_images, encode_prompts

        out = {
            k: batch[k] for k in ("flipped", "synthetic_label", "human_label", "human_mask", "propensity") if k in batch
        }
        if "latents" in batch:
            out["latents"] = batch["latents"]
            out["encoder_hidden_states"] = batch["prompt_embeds"]
            pooled = batch.get("pooled_prompt_embeds")
        else:
            pixels = batch["pixel_values"]  # [2B, 3, R, R], winners then losers
            out["latents"] = encode_images(self.vae, pixels.to(self.device)).float()
            out["encoder_hidden_states"], pooled = encode_prompts(
                batch["captions"], self.tokenizers, self.text_encoders
            )
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled
            out["add_time_ids"] = time_ids(batch, self.resolution)
        return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def train(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm

    from . import data
    from .arch import detect_arch
    from .trainer import NonFiniteLossError, PreferenceTrainer, TrainConfig

    output_dir = Path(args.output_dir)
    model_path = args.pretrained_model_name_or_path
    arch = detect_arch(model_path) if Path(model_path).is_dir() else ("sdxl" if "xl" in model_path.lower() else "sd15")
    resolution = args.resolution or (1024 if arch == "sdxl" else 512)
    beta = args.beta_dpo if args.beta_dpo is not None else ARCH_DEFAULTS[arch]["beta_dpo"]
    k1 = args.k1 if args.k1 is not None else ARCH_DEFAULTS[arch]["k1"]
    decays = tuple(float(d) for d in args.ema_decays.split(",") if d.strip()) if args.ema_decays else ()
    if args.loss_type == "dedpo" and args.human_fraction is None:
        raise ValueError(
            "human_fraction: --loss_type dedpo needs --human_fraction (the share of pairs that keep a human label)"
        )

    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=1,  # the trainer accumulates itself (it needs the window for skips)
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # data
    dedpo = args.loss_type == "dedpo"
    dataset_kwargs = dict(
        keep_ties=args.keep_ties, flip_rate=args.flip_rate, flip_seed=args.flip_seed, max_pairs=args.max_train_samples
    )
    if dedpo:
        dataset_kwargs.update(synthetic_labels=True, human_fraction=args.human_fraction, human_seed=args.human_seed)
    dataset = data.PreferenceDataset(
        args.dataset_name, resolution, check_images=not args.cache_latents, **dataset_kwargs
    )
    if len(dataset) == 0:
        raise ValueError(f"dataset_name: no usable pairs in {args.dataset_name} ({dataset.summary()})")
    encoder_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae = tokenizers = text_encoders = None
    if args.cache_latents:
        with accelerator.main_process_first():
            cache = data.LatentCache.build(
                dataset, args.cache_dir, model_path, dtype=encoder_dtype, device=accelerator.device
            )
        train_set = cache.view(dataset)
        logger.info("latent cache %s: %s", "hit" if cache.hit else "built", cache.path)
    else:
        vae, tokenizers, text_encoders = data.load_encoders(
            model_path, arch, dtype=encoder_dtype, device=accelerator.device
        )
        train_set = dataset
    summary = getattr(train_set, "dataset", dataset).summary()  # the cache view knows the undecodable rows
    logger.info("data: %s", summary)
    judge = dataset.judge_agreement() if dedpo else None
    if judge is not None:
        logger.info(
            "judge vs human labels on the %d human-labelled pairs: accuracy %.3f, mean |p - y| %.3f",
            judge["num_labelled"],
            judge["accuracy"],
            judge["mean_abs_error"],
        )

    world = accelerator.num_processes
    steps_per_epoch = max(
        1, math.ceil(len(train_set) / (args.train_batch_size * world * args.gradient_accumulation_steps))
    )
    max_steps = args.max_train_steps if args.max_train_steps is not None else args.num_train_epochs * steps_per_epoch
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * world

    # model
    # LoRA keeps the frozen base in the mixed-precision dtype; a full fine-tune trains float32 weights
    unet = UNet2DConditionModel.from_pretrained(
        model_path, subfolder="unet", torch_dtype=encoder_dtype if args.lora_rank > 0 else torch.float32
    )
    noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
    config = TrainConfig(
        loss_type=args.loss_type,
        beta=beta,
        rho=args.rho,
        k1=k1,
        k2=args.k2,
        c2=args.c2,
        ipo_tau=args.ipo_tau,
        weighting=args.weighting,
        margin=args.margin,
        metric_preset=args.metric_preset,
        eps=args.eps,
        ema_decays=decays,
        metric_warmup_steps=args.metric_warmup_steps,
        global_metric=args.global_metric,
        lora_rank=args.lora_rank,
        learning_rate=learning_rate,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        max_train_steps=max_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_weight_decay=args.adam_weight_decay,
        adam_epsilon=args.adam_epsilon,
        use_8bit_adam=args.use_8bit_adam,
        mixed_precision=accelerator.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        max_nonfinite_steps=args.max_nonfinite_steps,
        loss_backend=args.loss_backend,
    )
    trainer = PreferenceTrainer(unet, noise_scheduler, config, accelerator)
    if config.lora_rank > 0:
        install_lora_hooks(accelerator, type(trainer.base_unet))

    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    if args.resume_from_checkpoint and resume is None:
        logger.warning(
            "resume_from_checkpoint=%s: no checkpoint in %s, starting a new run",
            args.resume_from_checkpoint,
            output_dir,
        )
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("resumed from %s at step %d", resume, trainer.global_step)
        log_file = output_dir / "train_log.jsonl"
        if accelerator.is_main_process and log_file.exists():  # drop the lines of steps that are redone
            lines = [
                line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= trainer.global_step
            ]
            log_file.write_text("".join(line + "\n" for line in lines))

    if accelerator.is_main_process and report_to:
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("fastpref", config=hparams)

    batch_size = args.train_batch_size
    sampler = data.PairSampler(
        len(train_set), seed=args.seed, start=trainer.micro_step * batch_size * world, infinite=True
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=ShardSampler(sampler, batch_size, world, accelerator.process_index),
        collate_fn=data.collate_pairs,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )
    encode = Encoder(vae, tokenizers, text_encoders, resolution, accelerator.device)

    progress = tqdm(
        total=max_steps,
        initial=trainer.global_step,
        desc="steps",
        disable=args.no_progress or not accelerator.is_local_main_process,
    )
    window: List[dict] = []
    started = time.perf_counter()
    status = "finished"
    batches = iter(loader)
    try:
        while trainer.global_step < max_steps:
            out = trainer.train_step(encode(next(batches)))
            window.append(out)
            if not out["stepped"]:
                continue
            logs = window_logs(window, trainer)
            window = []
            if world > 1 and not config.global_metric:  # log the global batch's loss, not this process's
                logs["loss"] = float(
                    accelerator.reduce(torch.tensor(logs["loss"], device=accelerator.device), reduction="mean")
                )
            if accelerator.is_main_process:
                with open(output_dir / "train_log.jsonl", "a") as handle:
                    handle.write(json.dumps({"step": trainer.global_step, **logs}) + "\n")
            progress.update(1)
            progress.set_postfix(
                loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_acc']:.2f}" if "implicit_acc" in logs else "-"
            )
            accelerator.log(logs, step=trainer.global_step)
            if (
                args.checkpointing_steps
                and trainer.global_step % args.checkpointing_steps == 0
                and trainer.global_step < max_steps
            ):
                save_checkpoint(accelerator, output_dir, trainer.global_step, args.checkpoints_total_limit)
    except NonFiniteLossError:
        status = "aborted: non-finite loss"
        path = save_checkpoint(accelerator, output_dir, trainer.global_step, args.checkpoints_total_limit)
        logger.error("%s; saved %s", status, path)
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        if trainer.micro_step % config.gradient_accumulation_steps == 0:
            path = save_checkpoint(accelerator, output_dir, trainer.global_step, args.checkpoints_total_limit)
            logger.warning("interrupted; saved %s (resume with --resume_from_checkpoint latest)", path)
        raise
    finally:
        progress.close()
        if status != "finished":
            accelerator.end_training()

    save_checkpoint(accelerator, output_dir, trainer.global_step, args.checkpoints_total_limit)
    save_weights(accelerator, trainer, arch, output_dir)
    result = {
        "status": status,
        "arch": arch,
        "global_step": trainer.global_step,
        "skipped_steps": trainer.skipped_steps,
        "seconds": time.perf_counter() - started,
        "data": summary,
        "loss_type": args.loss_type,
        "beta": beta,
        "k1": k1,
        "processes": world,
    }
    if judge is not None:
        result["judge_agreement"] = judge
    if accelerator.is_main_process:
        (output_dir / "train_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    accelerator.end_training()
    return result


def window_logs(window: List[dict], trainer) -> dict:
    """Means over the micro-steps of one optimizer step."""
    logs = {}
    for key in ("loss", "implicit_acc", "u_mean", "weight_mean", "margin_mean", "u_flipped", "u_kept"):
        values = [w[key] for w in window if key in w]
        if values:
            logs[key] = sum(values) / len(values)
    logs["lr"] = window[-1]["lr"]
    logs["skipped_steps"] = trainer.skipped_steps
    return logs


def save_weights(accelerator, trainer, arch: str, output_dir: Path) -> None:
    """LoRA: ``pytorch_lora_weights.safetensors`` (diffusers' saver); full: ``unet/``."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unet = trainer.base_unet
    if trainer.config.lora_rank > 0:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="default"))
        pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
        pipeline.save_lora_weights(
            str(output_dir), unet_lora_layers={k: v.detach().float().cpu() for k, v in layers.items()}
        )
    else:
        unet.save_pretrained(str(output_dir / "unet"), safe_serialization=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"fastpref train: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # NonFiniteLossError and friends: the message says what to do
        from .trainer import NonFiniteLossError

        if isinstance(error, NonFiniteLossError):
            print(f"fastpref train: {error}", file=sys.stderr)
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
