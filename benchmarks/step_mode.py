"""One mode of the step benchmark (a LoRA rank, or a full fine-tune): its variants built, timed
and summed up into rows, a breakdown and the targets checked."""

from __future__ import annotations

import functools
import gc
import statistics
import time
from typing import Callable, Dict, List

from step_authors import AuthorsTrainer
from step_timing import REST, SUB_PHASES, TOP_PHASES, Encoding, Variant, batched_probe, install_phases, run_rounds

from fastpref.train import PreferenceTrainer, TrainConfig

DECAYS = (0.9999, 0.5)  # the authors' (and fastpref train's default) EMA decays, K = 2
# The targets, stated for SD1.5 on an H100; the script says whether the run it made meets them.
GOAL_ADAPTIVE = 1.5  # Adaptive (K=2) step <= 1.5x the latent-cached DPO step
GOAL_DPO = 1.3  # DPO samples/s >= 1.3x diffusers' script (the uncached DPO row)
AUTHORS_H100 = "6-11x"  # the authors' Adaptive step costs about 6-11x a DPO step on H100, SD1.5
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SD15_LOSS = dict(beta=1000.0, k1=10.0)  # the paper's SD1.5 settings (fastpref train's defaults)

METHODS = ("dpo", "fastpref", "authors")
# What runs each step, per variant (one micro-batch of B pairs = 2B images, no accumulation):
# - dpo/cached: Diffusion-DPO on cached latents and text embeddings (``--cache_latents``):
#   reference forward + policy forward/backward.
# - dpo/uncached: the same, but the VAE encodes the 2B images and the text encoder the B captions
#   every step (the SD 1.5 family's ``encode_images`` / ``encode_prompts``), as diffusers'
#   ``train_diffusion_dpo.py`` does: "diffusers' script".
# - fastpref/cached, fastpref/uncached: Adaptive-DPO, K = 2 EMA footprints kept on the device by
#   fastpref (LoRA: peft adapters switched for the no-grad forwards and updated by a foreach
#   lerp; full fine-tune: on-device copies).
# - authors/uncached, authors/cached: Adaptive-DPO, K = 2, the authors' footprint handling
#   (``step_authors.AuthorsEMAFootprints``), VAE + text every step as their script, or on cached
#   latents to isolate the cost of the footprints from that of the encoding.
VARIANTS = ("dpo/cached", "dpo/uncached", "fastpref/cached", "fastpref/uncached", "authors/uncached", "authors/cached")
LABELS = {
    "dpo/cached": "DPO, latents cached",
    "dpo/uncached": "DPO, VAE+text each step (diffusers' script)",
    "fastpref/cached": "Adaptive K=2, fastpref on-device footprints, latents cached",
    "fastpref/uncached": "Adaptive K=2, fastpref on-device footprints, VAE+text each step",
    "authors/uncached": (
        "Adaptive K=2, authors' method, re-implemented (EMAModel store/copy_to/restore, VAE+text each step)"
    ),
    "authors/cached": "Adaptive K=2, authors' EMAModel store/copy_to/restore, latents cached",
}


def train_config(method: str, lora_rank: int, mixed_precision: str, seed: int, family=None) -> TrainConfig:
    """The step's settings; beta and k1 the family's defaults (SD 1.5's: :data:`SD15_LOSS`)."""
    loss = SD15_LOSS if family is None else dict(beta=family.defaults.beta, k1=family.defaults.k1)
    return TrainConfig(
        loss_type="dpo" if method == "dpo" else "adaptive",
        ema_decays=DECAYS,
        metric_warmup_steps=0,  # every timed step evaluates the footprints
        lora_rank=lora_rank,
        mixed_precision=mixed_precision,
        learning_rate=1e-5,
        max_train_steps=1_000_000,
        seed=seed,
        **loss,
    )


def build_variants(keys, components, batches, encoding, lora_rank, mixed_precision, accelerator, seed) -> List[Variant]:
    _, cached = batches
    trainers = {}
    for method in METHODS:
        if not any(k.split("/")[0] == method for k in keys):
            continue
        config = train_config(method, lora_rank, mixed_precision, seed, components.family)
        kind = AuthorsTrainer if method == "authors" else PreferenceTrainer
        trainers[method] = kind(components.new_unet(), components.noise_scheduler, config, accelerator)
    variants = []
    for key in keys:
        method, caching = key.split("/")
        trainer = trainers[method]
        if caching == "cached":
            run = functools.partial(trainer.train_step, cached)
        else:
            run = uncached_step(trainer, encoding)
        variants.append(Variant(key, method, caching == "cached", trainer, run))
    return variants


def uncached_step(trainer, encoding: Encoding) -> Callable[[], dict]:
    def run():
        return trainer.train_step(encoding())

    return run


def run_mode(args, lora_rank: int, keys, components, batches, accelerator, sync) -> dict:
    """Time the variants ``keys`` in one mode (LoRA rank ``lora_rank``, or a full fine-tune at 0).

    All variants are built first (one trainer per method, shared by its cached and uncached
    variants; one VAE and text encoder shared by all) and run ``--warmup`` untimed rounds; then
    ``--steps`` timed rounds in which every variant runs one step, in an order rotated from round
    to round so that machine noise hits every variant alike. A step's time is ``perf_counter``
    around it, with a device synchronize on both sides on CUDA; batches are tensors in host
    memory, as a DataLoader hands them over, so image decoding and loading are never timed.
    Then ``--breakdown_rounds`` more rounds with per-phase timers (they add device syncs, so
    they are reported apart from the step times) and :func:`batched_probe`."""
    mode = f"lora-r{lora_rank}" if lora_rank > 0 else "full"
    print(f"\n## {mode}: building {len(keys)} variants", flush=True)
    encoding = Encoding(components, batches[0])
    variants = build_variants(
        keys, components, batches, encoding, lora_rank, MIXED_PRECISION[args.dtype], accelerator, args.seed
    )
    print(f"warm-up: {args.warmup} round(s); timing: {args.steps} interleaved round(s)", flush=True)
    run_rounds(variants, args.warmup, sync, record=False)
    gc.collect()
    run_rounds(variants, args.steps, sync, record=True, deadline=args.deadline)

    probe = None
    if args.breakdown_rounds > 0 and (args.deadline is None or time.perf_counter() < args.deadline):
        phases = install_phases(variants, encoding, accelerator, sync)
        phases.active = True
        run_rounds(variants, args.breakdown_rounds, sync, record=False, phases=phases)
        phases.active = False
        prober = next((v.trainer for v in variants if v.method == "fastpref"), variants[0].trainer)
        probe = batched_probe(prober, batches, sync, reps=max(1, args.breakdown_rounds))

    median = {v.key: statistics.median(v.times_ms) for v in variants}
    cpu_median = {v.key: statistics.median(v.cpu_ms) for v in variants}
    pairs = batches[1]["latents"].shape[0] // 2
    return {
        "mode": mode,
        "lora_rank": lora_rank,
        "interleaved": True,
        "rows": mode_rows(mode, lora_rank, variants, median, cpu_median, samples=2 * pairs),
        "goals": goals(median, cpu_median),
        "breakdown": mode_breakdown(variants),
        "batched_probe": probe,
    }


def mode_rows(
    mode: str, lora_rank: int, variants: List[Variant], median: Dict[str, float], cpu_median: Dict[str, float], samples
) -> List[dict]:
    """One row per variant: median step time, samples/s, ratios to the cached DPO step and to the
    authors' row with the same caching, the median CPU time and its ratio to the cached DPO
    step's, and the raw timings."""
    rows = []
    for v in variants:
        ms = median[v.key]
        base = median.get("dpo/cached")
        authors = median.get(f"authors/{'cached' if v.cached else 'uncached'}")
        rows.append(
            {
                "mode": mode,
                "variant": v.key,
                "label": LABELS[v.key],
                "method": v.method,
                "footprints": {
                    "dpo": "-",
                    "fastpref": "on-device" + (" adapters" if lora_rank else " copies"),
                    "authors": "EMAModel via CPU",
                }[v.method],
                "latents": "cached" if v.cached else "VAE+text each step",
                "ms": ms,
                "samples_per_s": samples / (ms / 1e3),
                "vs_dpo_cached": ms / base if base else None,
                "fastpref_over_authors": ms / authors if (v.method == "fastpref" and authors) else None,
                "cpu_ms": cpu_median[v.key],
                "cpu_vs_dpo_cached": cpu_median[v.key] / cpu_median["dpo/cached"] if base else None,
                "ms_min": min(v.times_ms),
                "ms_max": max(v.times_ms),
                "ms_mean": statistics.fmean(v.times_ms),
                "timings_ms": v.times_ms,
                "cpu_timings_ms": v.cpu_ms,
                "round_positions": v.positions,
                "steps_with_metric_on": v.metric_on,
                "skipped_steps": v.skipped,
            }
        )
    return rows


def mode_breakdown(variants: List[Variant]) -> Dict[str, dict]:
    """Per variant, the median ms of each phase over the breakdown rounds."""
    breakdown = {}
    for v in variants:
        if v.breakdown:
            names = [p for p in ("step", *TOP_PHASES, REST, *SUB_PHASES) if any(p in b for b in v.breakdown)]
            breakdown[v.key] = {p: statistics.median(b.get(p, 0.0) for b in v.breakdown) for p in names}
            breakdown[v.key]["rounds"] = len(v.breakdown)
    return breakdown


def goals(median: Dict[str, float], cpu_median: Dict[str, float]) -> dict:
    """The targets (:data:`GOAL_ADAPTIVE`, :data:`GOAL_DPO`) checked on one mode's median step
    times (the Adaptive ratio also on CPU times), and fastpref's speed-up over the authors'
    footprint handling."""
    out = {}
    if "dpo/cached" in median and "fastpref/cached" in median:
        ratio = median["fastpref/cached"] / median["dpo/cached"]
        out["adaptive_vs_dpo_cached"] = {
            "goal": f"Adaptive (K=2) step <= {GOAL_ADAPTIVE}x the latent-cached DPO step",
            "value": ratio,
            "met": ratio <= GOAL_ADAPTIVE,
            "cpu_value": cpu_median["fastpref/cached"] / cpu_median["dpo/cached"],
            "authors_uncached_vs_dpo_cached": median["authors/uncached"] / median["dpo/cached"]
            if "authors/uncached" in median
            else None,
            "authors_cached_vs_dpo_cached": median["authors/cached"] / median["dpo/cached"]
            if "authors/cached" in median
            else None,
            "authors_reference": f"the authors' Adaptive step costs about {AUTHORS_H100} a DPO step on H100, SD1.5",
        }
    if "dpo/cached" in median and "dpo/uncached" in median:
        ratio = median["dpo/uncached"] / median["dpo/cached"]  # = samples/s cached / samples/s uncached
        out["dpo_samples_per_s_vs_diffusers_script"] = {
            "goal": f"DPO samples/s >= {GOAL_DPO}x diffusers' script (the uncached DPO row)",
            "value": ratio,
            "met": ratio >= GOAL_DPO,
        }
    if "fastpref/uncached" in median and "authors/uncached" in median:
        out["fastpref_speedup_over_authors"] = {
            "same_caching_uncached": median["authors/uncached"] / median["fastpref/uncached"],
            "fastpref_cached_vs_authors_way": median["authors/uncached"] / median["fastpref/cached"]
            if "fastpref/cached" in median
            else None,
            "same_caching_cached": median["authors/cached"] / median["fastpref/cached"]
            if {"authors/cached", "fastpref/cached"} <= set(median)
            else None,
        }
    return out
