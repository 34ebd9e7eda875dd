"""The study's training runs: which runs there are (:class:`RunSpec`, :func:`study_specs`), the
labelled data and batches of a run, one run through :class:`fastpref.train.PreferenceTrainer`
with its evaluation (:func:`train_run`), and a pool of single-threaded worker processes."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..train import PairSampler, PreferenceTrainer, TrainConfig
from . import world as tw
from .config import DEDPO_ARMS, FLIP_RATES, METHODS, STRUCTURED_METHODS, StudyConfig


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: ``study`` in ``flip`` / ``structured`` / ``dedpo`` / ``tune``."""

    study: str
    method: str
    rate: int
    seed: int
    beta: Optional[float] = None  # tune: overrides
    learning_rate: Optional[float] = None
    steps: Optional[int] = None


def study_specs(study: StudyConfig) -> List[RunSpec]:
    """Every run of the study, the slowest kinds (adaptive types) first for a balanced pool."""
    specs = []
    for seed in range(study.seeds):
        for method in METHODS:
            for rate in FLIP_RATES:
                specs.append(RunSpec("flip", method, rate, seed))
        for method in STRUCTURED_METHODS:
            specs.append(RunSpec("structured", method, 0, seed))
        for arm in DEDPO_ARMS:
            if arm != "all-human":  # = the clean DPO run of the flip study (reused)
                specs.append(RunSpec("dedpo", arm, 0, seed))
    return sorted(specs, key=lambda s: (s.method not in ("adaptive", "adaptive-ipo"), s.seed))


def _loss_type(spec: RunSpec) -> str:
    if spec.study == "dedpo":
        return "dedpo" if spec.method == "dedpo" else "dpo"
    return spec.method


def run_data(world: tw.World, spec: RunSpec, study: StudyConfig) -> Dict[str, torch.Tensor]:
    """The labelled data of a run over the world's pairs (stored winner first by the reward):

    ``indices`` int64 ``[M]`` (the pairs it trains on), ``swap`` bool ``[N]`` (present the stored
    loser first), ``flipped`` bool ``[N]`` (the presented label disagrees with the reward), and
    for DeDPO ``synthetic_label``, ``human_label``, ``human_mask``, ``propensity`` (``[N]``,
    relative to the presented order)."""
    pairs = world.pairs
    n = pairs["prompt"].shape[0]
    indices = torch.arange(n)
    out: Dict[str, torch.Tensor] = {}
    if spec.study in ("flip", "tune"):
        swap = tw.flip_mask(n, spec.rate / 100.0, spec.seed)
    elif spec.study == "structured":
        _, swap = tw.structured_minority(pairs, world.config)
    elif spec.study == "dedpo":
        judge, _ = tw.synthetic_judge(pairs, world.config, biased_colours=study.judge_biased_colours, seed=spec.seed)
        human = tw.flip_mask(n, study.human_fraction, spec.seed + 7_000_000)  # a separate seeded choice
        if spec.method == "human-only":
            swap = torch.zeros(n, dtype=torch.bool)
            indices = torch.nonzero(human).flatten()
        elif spec.method == "all-human":
            swap = torch.zeros(n, dtype=torch.bool)
        else:  # the judge orders every pair: its preferred image first
            swap = judge < 0.5
            if spec.method == "dedpo":
                out["synthetic_label"] = torch.where(swap, 1.0 - judge, judge)
                out["human_label"] = torch.where(human, (~swap).to(torch.float32), torch.full((n,), float("nan")))
                out["human_mask"] = human
                out["propensity"] = torch.full((n,), float(study.human_fraction))
    else:
        raise ValueError(f"unknown study {spec.study!r}")
    out.update(indices=indices, swap=swap, flipped=swap.clone())
    return out


def make_batch(world: tw.World, data: Dict[str, torch.Tensor], idx: torch.Tensor, table: torch.Tensor) -> dict:
    """The trainer's batch for pair indices ``idx [B]``: ``latents [2B, 3, H, W]`` (presented
    order: the B first images, then the B second ones), ``encoder_hidden_states [B, 2, D]``,
    ``flipped [B]`` and any DeDPO inputs."""
    latents = world.pairs["latents"][idx]
    swap = data["swap"][idx]
    latents = torch.where(swap[:, None, None, None, None], latents.flip(1), latents)
    batch = {
        "latents": latents.transpose(0, 1).flatten(0, 1),
        "encoder_hidden_states": table[world.pairs["prompt"][idx]],
        "flipped": data["flipped"][idx],
    }
    for key in ("synthetic_label", "human_label", "human_mask", "propensity"):
        if key in data:
            batch[key] = data[key][idx]
    return batch


def train_run(world: tw.World, spec: RunSpec, study: StudyConfig) -> dict:
    """Train one run through :class:`fastpref.train.trainer.PreferenceTrainer` and evaluate it.
    Returns a record: ``reward`` (held-out mean), ``per_colour``, ``seconds``, the last steps'
    ``loss`` / ``implicit_acc``, and for runs with the metric on, per-pair arrays ``u``,
    ``weight``, ``flipped``, ``member`` (structured minority) over every step after the warm-up."""
    start = time.perf_counter()
    steps = spec.steps or study.steps
    config = TrainConfig(
        loss_type=_loss_type(spec),
        beta=spec.beta or study.beta,
        learning_rate=spec.learning_rate or study.learning_rate,
        max_train_steps=steps,
        lora_rank=0,
        seed=spec.seed,
        lr_scheduler="constant",
    )
    trainer = PreferenceTrainer(world.base_unet(), tw.make_scheduler(), config)
    data = run_data(world, spec, study)
    indices = data["indices"]
    member = None
    if spec.study == "structured":
        member, _ = tw.structured_minority(world.pairs, world.config)
    table = world.table
    order = iter(PairSampler(len(indices), seed=spec.seed, infinite=True))
    collected = {"u": [], "weight": [], "flipped": [], "member": []}
    tail = {"loss": [], "implicit_acc": []}
    for step in range(steps):
        idx = indices[torch.tensor([next(order) for _ in range(study.batch_pairs)])]
        logs = trainer.train_step(make_batch(world, data, idx, table))
        if step >= steps - max(1, steps // 5):
            tail["loss"].append(logs["loss"])
            tail["implicit_acc"].append(logs.get("implicit_acc", float("nan")))
        if logs.get("metric_on"):
            collected["u"].append(logs["u"].float().cpu().numpy())
            collected["weight"].append(logs["weight"].float().cpu().numpy())
            collected["flipped"].append(logs["flipped"].cpu().numpy())
            if member is not None:
                collected["member"].append(member[idx].numpy())
    evaluation = tw.evaluate(trainer.base_unet, world.config)
    record = {
        "study": spec.study,
        "method": spec.method,
        "rate": spec.rate,
        "seed": spec.seed,
        "steps": steps,
        "beta": config.beta,
        "learning_rate": config.learning_rate,
        "reward": evaluation["mean"],
        "per_colour": evaluation["per_colour"],
        "loss": float(np.mean(tail["loss"])),
        "implicit_acc": float(np.nanmean(tail["implicit_acc"])) if tail["implicit_acc"] else None,
        "skipped_steps": trainer.skipped_steps,
    }
    if spec.study == "structured":
        ids = tw.minority_prompt_ids(world.config)
        record["minority_colour_all_prompts"] = tw.evaluate(trainer.base_unet, world.config, prompt_ids=ids)["mean"]
    if collected["u"]:
        for key in ("u", "weight", "flipped", "member"):
            record[key] = np.concatenate(collected[key]) if collected[key] else None
    record["seconds"] = time.perf_counter() - start
    return record


# -- process pool ---------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(world_config: tw.WorldConfig, cache_dir: str, study: StudyConfig, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["world"] = tw.load_or_build(world_config, cache_dir)
    _WORKER["study"] = study


def _worker_run(spec: RunSpec) -> dict:
    return train_run(_WORKER["world"], spec, _WORKER["study"])


def run_all(
    specs: Sequence[RunSpec], world: tw.World, study: StudyConfig, cache_dir: Path, jobs: int, progress=None
) -> List[dict]:
    """Run every spec (in ``jobs`` single-threaded processes when ``jobs > 1``, else here);
    returns the records in the order of ``specs``."""
    records: List[Optional[dict]] = [None] * len(specs)
    if jobs <= 1:
        for i, spec in enumerate(specs):
            records[i] = train_run(world, spec, study)
            if progress is not None:
                progress(records[i])
        return records  # type: ignore[return-value]
    import concurrent.futures
    import multiprocessing

    threads = 1  # one thread per process: see fastpref.demo.study.main
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_init, initargs=(world.config, str(cache_dir), study, threads)
    ) as pool:
        futures = {pool.submit(_worker_run, spec): i for i, spec in enumerate(specs)}
        for future in concurrent.futures.as_completed(futures):
            records[futures[future]] = future.result()
            if progress is not None:
                progress(records[futures[future]])
    return records  # type: ignore[return-value]
