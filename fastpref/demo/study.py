"""``fastpref demo``: Adaptive-DPO's label-flip study (paper Tab. 2 / Tab. 8, Fig. 3) in the toy
preference world of :mod:`fastpref.demo.world`, through fastpref's own training loop
(:class:`fastpref.train.trainer.PreferenceTrainer`, the object ``fastpref train`` runs on SD1.5).

What it runs (every run starts from the same cached base model, sees the same pairs in the same
seeded order for a seed, and takes the same number of optimizer steps):

1. **Label flips.** DPO, Adaptive-DPO, Robust-DPO, IPO and Adaptive-IPO at 0 / 10 / 20 / 30 %
   flipped pairs (exactly ``round(rate * N)`` pairs, chosen by the seed), ``--seeds`` seeds.
   Reported: mean reward of DDIM samples on the held-out prompts (mean +- std over seeds), gain
   over the base model, the share of clean DPO's gain kept, the AUROC of Adaptive-DPO's metric u
   for flipped vs kept pairs (u and the ``flipped`` flags from the trainer's per-step logs,
   after the metric warm-up), the mean weight W of flipped and kept pairs, and the paper's
   Fig. 3: the share of flipped pairs per u bin.
2. **Structured minority.** DPO, Adaptive-DPO, Robust-DPO when every pair of one colour is
   labelled by "vivid" annotators who prefer the brighter image (see
   :func:`fastpref.demo.world.structured_minority`): reward on all held-out prompts, on the
   minority colour's prompts and on the others, and the AUROC of u for the pairs whose label
   disagrees with the reward.
3. **DeDPO** (issue 7 part 3). A biased, noisy judge labels every pair, humans label a seeded
   ``--human_fraction`` of them (propensity = that fraction): DPO on the human-labelled pairs
   only, DPO on the judge's labels, DeDPO (``loss_type="dedpo"``) and DPO on all-human labels
   (the upper bound: that run is the same run as clean DPO of study 1 -- same seed, data, order
   and steps -- and is reused).

Honesty protocol (issue 6 §3): the world, beta (50: the paper's 1000 is for SD's 16384-dim
latents, and was far too large for these 192-pixel ones), the learning rate (3e-4), the batch (32
pairs) and the step budget (30 steps, set by the 10-minute run time) were fixed with DPO at 0 %
flips only (see ``docs/demo.md`` for what was tried; ``--tune`` reruns that grid); every method then runs once per seed with the spec's default method
hyper-parameters (rho = 15, k1 = 10, k2 = -1/beta, c2 = batch mean, EMA decays 0.9999 and 0.5,
eps = 0.1 for Robust-DPO, tau = beta for IPO). The tables show whatever comes out.

Outputs in ``--output_dir`` (default ``runs/demo``): ``results.json``, ``results.md`` (also
printed), ``reward_vs_flip.png``, ``flipped_ratio_vs_u.png``, ``structured.png``, ``dedpo.png``,
and the cached world (``world-<key>/``: base model and pairs, reused by reruns).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import world as tw

FLIP_RATES = (0, 10, 20, 30)
METHODS = ("dpo", "adaptive", "robust", "ipo", "adaptive-ipo")
METHOD_NAMES = {
    "dpo": "DPO",
    "adaptive": "Adaptive-DPO",
    "robust": "Robust-DPO",
    "ipo": "IPO",
    "adaptive-ipo": "Adaptive-IPO",
}
STRUCTURED_METHODS = ("dpo", "adaptive", "robust")
DEDPO_ARMS = ("human-only", "synthetic", "dedpo", "all-human")
DEDPO_NAMES = {
    "human-only": "DPO, human-labelled pairs only",
    "synthetic": "DPO, judge's labels",
    "dedpo": "DeDPO (judge + human labels)",
    "all-human": "DPO, all-human labels (upper bound)",
}
# The grid the baseline (DPO at 0 % flips) was tuned on (``--tune``); see docs/demo.md.
TUNE_BETAS = (25.0, 50.0, 100.0, 250.0, 1000.0)
TUNE_LRS = (1e-4, 3e-4, 1e-3)
U_BINS = 10
MIN_BIN_COUNT = 10  # u bins with fewer pairs are left out of the Fig. 3 plot


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The study's size and the baseline's hyper-parameters (fixed on DPO at 0 % flips).

    Attributes:
        world: the toy world.
        seeds: training seeds 0 .. seeds-1 (each: noise draws, pair order, flipped pairs).
        steps: optimizer steps per run (every method, every rate).
        batch_pairs: pairs per step.
        beta: fastpref's beta (z = beta * l, l a difference of per-sample mean squared errors).
        learning_rate: AdamW learning rate (constant), full fine-tune of the tiny UNet.
        human_fraction: share of pairs with a human label in the DeDPO study.
        judge_biased_colours: prompts on which the synthetic judge is systematically wrong.
    """

    world: tw.WorldConfig
    seeds: int = 3
    steps: int = 30
    batch_pairs: int = 32
    beta: float = 50.0
    learning_rate: float = 3e-4
    human_fraction: float = 0.1
    judge_biased_colours: Tuple[str, ...] = ("blue", "magenta")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["world"] = self.world.to_dict()
        return out


def full_config(seeds: int = 3) -> StudyConfig:
    """The default study (``fastpref demo``)."""
    return StudyConfig(world=tw.WorldConfig(), seeds=seeds)


def quick_config(seeds: int = 1) -> StudyConfig:
    """``--quick``: the same study at CI size (a briefly pretrained world, few pairs and steps)."""
    world = tw.WorldConfig(pretrain_steps=120, pretrain_batch=64, num_pairs=256, eval_samples=4, sample_steps=6)
    return StudyConfig(world=world, seeds=seeds, steps=10, batch_pairs=16)


def method_defaults() -> dict:
    """The method hyper-parameters every run uses (the spec's / paper's defaults, unchanged)."""
    from ..train.trainer import TrainConfig

    default = TrainConfig()
    return {
        "rho": default.rho,
        "k1": default.k1,
        "k2": "-1/beta",
        "c2": "batch mean of l_theta",
        "metric_preset": default.metric_preset,
        "ema_decays": list(default.ema_decays),
        "ema_warmup": default.ema_warmup,
        "metric_warmup_micro_steps": default.warmup_micro_steps,
        "eps_robust": default.eps,
        "ipo_tau": "beta",
        "weighting_adaptive": "linear",
        "margin_adaptive": "quadratic",
        "max_grad_norm": default.max_grad_norm,
        "adam_weight_decay": default.adam_weight_decay,
        "lr_scheduler": "constant",
        "lora_rank": 0,
    }


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (float64 ``[N]``), tied values sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = 0.5 * (start + end) + 1.0
        start = end + 1
    return ranks


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` vs the rest: the probability
    that a random positive scores above a random negative, ties counting one half (the
    Mann-Whitney U statistic over ``n_pos * n_neg``). Raises ``ValueError`` when a class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores and positive must be 1-d of the same length, got {scores.shape} and {positive.shape}")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs at least one positive and one negative")
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def flipped_ratio_per_bin(
    u: np.ndarray, flipped: np.ndarray, edges: np.ndarray
) -> Tuple[List[int], List[Optional[float]]]:
    """Fig. 3: for bins ``[edges[i], edges[i+1])`` (the last one closed), the number of pairs
    and the share of flipped pairs among them (``None`` for an empty bin)."""
    u = np.asarray(u, dtype=np.float64)
    flipped = np.asarray(flipped, dtype=bool)
    index = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, len(edges) - 2)
    counts, ratios = [], []
    for i in range(len(edges) - 1):
        inside = index == i
        counts.append(int(inside.sum()))
        ratios.append(float(flipped[inside].mean()) if inside.any() else None)
    return counts, ratios


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------


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
    from ..train.data import PairSampler
    from ..train.trainer import PreferenceTrainer, TrainConfig

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

    threads = 1  # see main()
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


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def _find(records: Sequence[dict], study: str, method: str, rate: int = 0) -> List[dict]:
    return sorted(
        (r for r in records if r["study"] == study and r["method"] == method and r["rate"] == rate),
        key=lambda r: r["seed"],
    )


def summarize(records: Sequence[dict], world: tw.World, study: StudyConfig) -> dict:
    """The results dictionary (``results.json``) from every run's record."""
    base = float(world.base_reward["mean"])
    out: dict = {
        "flip_rates": list(FLIP_RATES),
        "seeds": study.seeds,
        "base_reward": base,
        "base_reward_per_colour": world.base_reward["per_colour"],
    }
    reward, reward_std, gain, retained = {}, {}, {}, {}
    clean_gain = mean_std([r["reward"] for r in _find(records, "flip", "dpo", 0)])[0] - base
    out["clean_dpo_gain"] = clean_gain
    for method in METHODS:
        reward[method], reward_std[method], gain[method], retained[method] = {}, {}, {}, {}
        for rate in FLIP_RATES:
            m, s = mean_std([r["reward"] for r in _find(records, "flip", method, rate)])
            reward[method][str(rate)], reward_std[method][str(rate)] = m, s
            gain[method][str(rate)] = m - base
            retained[method][str(rate)] = (m - base) / clean_gain if clean_gain > 0 else None
    out.update(reward=reward, reward_std=reward_std, gain=gain, retained_share_of_clean_dpo_gain=retained)

    # the metric u: AUROC for flipped vs kept, weights, Fig. 3 bins (Adaptive-DPO runs; Adaptive-IPO alongside)
    for method, key in (("adaptive", "auroc_u_flipped"), ("adaptive-ipo", "auroc_u_flipped_adaptive_ipo")):
        out[key], out[key + "_std"] = {}, {}
        for rate in FLIP_RATES[1:]:
            values = [
                auroc(r["u"], r["flipped"]) for r in _find(records, "flip", method, rate) if r.get("u") is not None
            ]
            out[key][str(rate)], out[key + "_std"][str(rate)] = mean_std(values) if values else (None, None)
    weights = {}
    for rate in FLIP_RATES:
        runs = [r for r in _find(records, "flip", "adaptive", rate) if r.get("u") is not None]
        if not runs:
            continue
        w = np.concatenate([r["weight"] for r in runs])
        f = np.concatenate([r["flipped"] for r in runs]).astype(bool)
        u = np.concatenate([r["u"] for r in runs])
        weights[str(rate)] = {
            "weight_kept": float(w[~f].mean()) if (~f).any() else None,
            "weight_flipped": float(w[f].mean()) if f.any() else None,
            "u_kept": float(u[~f].mean()) if (~f).any() else None,
            "u_flipped": float(u[f].mean()) if f.any() else None,
            "weight_quantiles_kept": [float(q) for q in np.quantile(w[~f], [0.1, 0.5, 0.9])] if (~f).any() else None,
            "weight_quantiles_flipped": [float(q) for q in np.quantile(w[f], [0.1, 0.5, 0.9])] if f.any() else None,
        }
    out["adaptive_metric"] = weights
    bins = {
        "binning": f"{U_BINS} bins of equal count (quantiles of u) per flip rate; Adaptive-DPO runs, all seeds, every step after the warm-up"
    }
    for rate in FLIP_RATES[1:]:
        runs = [r for r in _find(records, "flip", "adaptive", rate) if r.get("u") is not None]
        if not runs:
            continue
        u = np.concatenate([r["u"] for r in runs])
        f = np.concatenate([r["flipped"] for r in runs])
        edges = np.unique(np.quantile(u, np.linspace(0.0, 1.0, U_BINS + 1)))
        if len(edges) < 2:
            edges = np.array([u.min(), u.max() + 1e-12])
        counts, ratios = flipped_ratio_per_bin(u, f, edges)
        bins[str(rate)] = {"edges": [float(e) for e in edges], "count": counts, "flipped_ratio": ratios}
    out["u_bins"] = bins

    # structured minority
    pairs = world.pairs
    member, swapped = tw.structured_minority(pairs, world.config)
    structured = {
        "minority_colour": world.config.minority_colour,
        "criterion": "the minority prefers the brighter image (higher mean brightness)",
        "minority_share_of_pairs": float(member.float().mean()),
        "minority_labels_against_reward": float(swapped[member].float().mean()) if member.any() else None,
        "base_reward_minority_colour": world.base_reward["per_colour"].get(world.config.minority_colour),
        "reward": {},
        "reward_std": {},
        "reward_minority_colour": {},
        "reward_minority_colour_std": {},
        "reward_other_colours": {},
        "reward_other_colours_std": {},
        "reward_minority_colour_all_prompts": {},
        "reward_minority_colour_all_prompts_std": {},
        "auroc_u_against_reward": None,
    }
    other = [c for c in tw.colour_names() if c != world.config.minority_colour]
    for method in STRUCTURED_METHODS:
        runs = _find(records, "structured", method)
        if not runs:
            continue
        structured["reward"][method], structured["reward_std"][method] = mean_std([r["reward"] for r in runs])
        mc = [r["per_colour"][world.config.minority_colour] for r in runs]
        structured["reward_minority_colour"][method], structured["reward_minority_colour_std"][method] = mean_std(mc)
        structured["reward_other_colours"][method], structured["reward_other_colours_std"][method] = mean_std(
            [np.mean([r["per_colour"][c] for c in other if c in r["per_colour"]]) for r in runs]
        )
        (
            structured["reward_minority_colour_all_prompts"][method],
            structured["reward_minority_colour_all_prompts_std"][method],
        ) = mean_std([r["minority_colour_all_prompts"] for r in runs])
    runs = [r for r in _find(records, "structured", "adaptive") if r.get("u") is not None]
    if runs:
        u = np.concatenate([r["u"] for r in runs])
        f = np.concatenate([r["flipped"] for r in runs]).astype(bool)
        m = np.concatenate([r["member"] for r in runs]).astype(bool)
        if f.any() and (~f).any():
            structured["auroc_u_against_reward"] = auroc(u, f)
        if m.any() and (~m).any():
            structured["auroc_u_minority_member"] = auroc(u, m)
            structured["weight_minority"] = float(np.concatenate([r["weight"] for r in runs])[m].mean())
            structured["weight_majority"] = float(np.concatenate([r["weight"] for r in runs])[~m].mean())
    structured["base_reward_minority_colour_all_prompts"] = world.base_reward.get("minority_colour_all_prompts")
    out["structured"] = structured

    # DeDPO
    judge, biased = tw.synthetic_judge(pairs, world.config, biased_colours=study.judge_biased_colours, seed=0)
    dedpo = {
        "human_fraction": study.human_fraction,
        "propensity": study.human_fraction,
        "judge": {
            "biased_colours": list(study.judge_biased_colours),
            "strength": 2.0,
            "noise": 1.0,
            "accuracy_seed0": float((judge > 0.5).float().mean()),
            "accuracy_on_biased_prompts_seed0": float((judge[biased] > 0.5).float().mean()) if biased.any() else None,
            "accuracy_elsewhere_seed0": float((judge[~biased] > 0.5).float().mean()) if (~biased).any() else None,
        },
        "reward": {},
        "reward_std": {},
        "note": "all-human is the clean DPO run of the flip study (same seed, pairs, order and steps)",
    }
    for arm in DEDPO_ARMS:
        runs = _find(records, "flip", "dpo", 0) if arm == "all-human" else _find(records, "dedpo", arm)
        if runs:
            dedpo["reward"][arm], dedpo["reward_std"][arm] = mean_std([r["reward"] for r in runs])
    out["dedpo"] = dedpo
    return out


def _fmt(mean: Optional[float], std: Optional[float] = None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def markdown(results: dict) -> str:
    """The tables of ``results.md``: Tab. 2's layout (method, flip rate, reward) plus gain, the
    share of clean DPO's gain kept and the AUROC of u; the structured minority; DeDPO."""
    seeds = results["seeds"]
    lines = [
        f"Toy-world label-flip study: mean reward of DDIM samples on held-out prompts (mean ± std over {seeds} seed(s)); "
        f"base model {results['base_reward']:.3f}.",
        "",
        "| Method | Label-flip rate (%) | Reward (↑) | Gain over base | Share of clean DPO's gain | AUROC of u, flipped vs kept |",
        "|---|---|---|---|---|---|",
        f"| Base model | – | {results['base_reward']:.3f} | – | – | – |",
    ]
    for method in METHODS:
        for i, rate in enumerate(FLIP_RATES):
            key = str(rate)
            au = "–"
            if method in ("adaptive", "adaptive-ipo") and rate > 0:
                name = "auroc_u_flipped" if method == "adaptive" else "auroc_u_flipped_adaptive_ipo"
                au = _fmt(results[name][key], results[name + "_std"][key], 2)
            lines.append(
                f"| {METHOD_NAMES[method] if i == 0 else ''} | {rate} | {_fmt(results['reward'][method][key], results['reward_std'][method][key])} "
                f"| {results['gain'][method][key]:+.3f} | {_pct(results['retained_share_of_clean_dpo_gain'][method][key])} | {au} |"
            )
    metric = results.get("adaptive_metric", {})
    if metric:
        lines += [
            "",
            "Adaptive-DPO's metric u and weight W on flipped and kept pairs (all steps after the warm-up, all seeds):",
            "",
            "| Flip rate (%) | u kept | u flipped | W kept | W flipped |",
            "|---|---|---|---|---|",
        ]
        for rate, m in metric.items():
            lines.append(
                f"| {rate} | {_fmt(m['u_kept'], None, 4)} | {_fmt(m['u_flipped'], None, 4)} | {_fmt(m['weight_kept'])} | {_fmt(m['weight_flipped'])} |"
            )
    s = results["structured"]
    lines += [
        "",
        f"Structured minority: every pair of colour **{s['minority_colour']}** ({_pct(s['minority_share_of_pairs'])} of the pairs) is labelled by "
        f"annotators who prefer the brighter image; {_pct(s['minority_labels_against_reward'])} of those labels disagree with the reward. "
        f"AUROC of Adaptive-DPO's u for labels against the reward: {_fmt(s['auroc_u_against_reward'], None, 2)}; "
        f"for minority membership: {_fmt(s.get('auroc_u_minority_member'), None, 2)}.",
        "",
        f"| Method | Reward, held-out (↑) | Held-out {s['minority_colour']} prompts | Held-out other colours | All {s['minority_colour']} prompts |",
        "|---|---|---|---|---|",
        f"| Base model | {results['base_reward']:.3f} | {_fmt(s['base_reward_minority_colour'])} | – | {_fmt(s.get('base_reward_minority_colour_all_prompts'))} |",
    ]
    for method in STRUCTURED_METHODS:
        if method in s["reward"]:
            lines.append(
                f"| {METHOD_NAMES[method]} | {_fmt(s['reward'][method], s['reward_std'][method])} | "
                f"{_fmt(s['reward_minority_colour'][method], s['reward_minority_colour_std'][method])} | "
                f"{_fmt(s['reward_other_colours'][method], s['reward_other_colours_std'][method])} | "
                f"{_fmt(s['reward_minority_colour_all_prompts'][method], s['reward_minority_colour_all_prompts_std'][method])} |"
            )
    d = results["dedpo"]
    judge = d["judge"]
    lines += [
        "",
        f"DeDPO: a judge that is right on {_pct(judge['accuracy_elsewhere_seed0'])} of pairs but systematically wrong on "
        f"{', '.join(judge['biased_colours'])} prompts (right on {_pct(judge['accuracy_on_biased_prompts_seed0'])}), "
        f"{_pct(judge['accuracy_seed0'])} overall; human labels on {_pct(d['human_fraction'])} of the pairs (propensity {d['human_fraction']:g}).",
        "",
        "| Labels | Reward (↑) | Gain over base |",
        "|---|---|---|",
    ]
    for arm in DEDPO_ARMS:
        if arm in d["reward"]:
            lines.append(
                f"| {DEDPO_NAMES[arm]} | {_fmt(d['reward'][arm], d['reward_std'][arm])} | {d['reward'][arm] - results['base_reward']:+.3f} |"
            )
    return "\n".join(lines) + "\n"


def write_plots(results: dict, output_dir: Path) -> List[str]:
    """The PNG charts (drawn with :mod:`fastpref.demo.pngplot`); returns their file names."""
    from . import pngplot

    names = []
    series = {
        METHOD_NAMES[m]: (
            list(FLIP_RATES),
            [results["reward"][m][str(r)] for r in FLIP_RATES],
            [results["reward_std"][m][str(r)] for r in FLIP_RATES],
        )
        for m in METHODS
    }
    pngplot.line_chart(
        output_dir / "reward_vs_flip.png",
        series,
        title="Held-out reward vs label-flip rate (mean ± std over seeds)",
        xlabel="label-flip rate (%)",
        ylabel="reward",
        hline=(results["base_reward"], "base model"),
    )
    names.append("reward_vs_flip.png")
    bins = results["u_bins"]
    series = {}
    for rate in FLIP_RATES[1:]:
        if str(rate) in bins:
            b = bins[str(rate)]
            ys = [r if c >= MIN_BIN_COUNT else None for r, c in zip(b["flipped_ratio"], b["count"])]
            series[f"{rate} % flipped"] = (list(range(1, len(ys) + 1)), ys, None)
    if series:
        pngplot.line_chart(
            output_dir / "flipped_ratio_vs_u.png",
            series,
            title="Fig. 3: share of flipped pairs per bin of Adaptive-DPO's u (equal-count bins)",
            xlabel="bin of u, low to high (bin edges in results.json)",
            ylabel="flipped share",
        )
        names.append("flipped_ratio_vs_u.png")
    s = results["structured"]
    methods = [m for m in STRUCTURED_METHODS if m in s["reward"]]
    if methods:
        colour = s["minority_colour"]
        labels = [f"{METHOD_NAMES[m]}, all" for m in methods] + [f"{METHOD_NAMES[m]}, {colour}" for m in methods]
        values = [s["reward"][m] for m in methods] + [s["reward_minority_colour_all_prompts"][m] for m in methods]
        errs = [s["reward_std"][m] for m in methods] + [s["reward_minority_colour_all_prompts_std"][m] for m in methods]
        pngplot.bar_chart(
            output_dir / "structured.png",
            labels,
            values,
            errs=errs,
            ylabel="reward",
            size=(900, 460),
            title=f"Structured minority: reward on the held-out prompts (all) and on every {colour} prompt",
            hline=(results["base_reward"], "base model, held-out"),
        )
        names.append("structured.png")
    d = results["dedpo"]
    arms = [a for a in DEDPO_ARMS if a in d["reward"]]
    if arms:
        pngplot.bar_chart(
            output_dir / "dedpo.png",
            arms,
            [d["reward"][a] for a in arms],
            errs=[d["reward_std"][a] for a in arms],
            title="DeDPO: held-out reward by labels used",
            ylabel="reward",
            hline=(results["base_reward"], "base model"),
        )
        names.append("dedpo.png")
    return names


def machine() -> dict:
    """The machine the study ran on."""
    from ..machine import cpu_model

    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------------------------
# tuning (DPO at 0 % flips only)
# ----------------------------------------------------------------------------------------------


def tune(
    world: tw.World,
    study: StudyConfig,
    cache_dir: Path,
    jobs: int,
    betas: Sequence[float],
    lrs: Sequence[float],
    steps: Sequence[int],
    progress=None,
) -> List[dict]:
    """DPO at 0 % flips over a grid of beta x learning rate x steps, every seed: the only runs
    the baseline's hyper-parameters were chosen from. Returns one row per grid point."""
    specs = [
        RunSpec("tune", "dpo", 0, seed, beta=b, learning_rate=lr, steps=n)
        for b in betas
        for lr in lrs
        for n in steps
        for seed in range(study.seeds)
    ]
    records = run_all(specs, world, study, cache_dir, jobs, progress)
    rows = []
    for b in betas:
        for lr in lrs:
            for n in steps:
                runs = [r for r in records if r["beta"] == b and r["learning_rate"] == lr and r["steps"] == n]
                m, s = mean_std([r["reward"] for r in runs])
                rows.append(
                    {
                        "beta": b,
                        "learning_rate": lr,
                        "steps": n,
                        "reward": m,
                        "reward_std": s,
                        "gain": m - world.base_reward["mean"],
                        "seconds": float(np.mean([r["seconds"] for r in runs])),
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastpref demo", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output_dir", default="runs/demo", help="where results, plots and the cached world go (default: runs/demo)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI size: a briefly pretrained world, 1 seed, few steps (same JSON layout)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of training seeds (default 3; 1 with --quick)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: min(2, cpu count); 1 = in this process)"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="only run the baseline's tuning grid (DPO at 0 %% flips) and write tuning.json",
    )
    parser.add_argument(
        "--tune_betas", type=float, nargs="+", default=list(TUNE_BETAS), help="betas of the --tune grid"
    )
    parser.add_argument(
        "--tune_lrs", type=float, nargs="+", default=list(TUNE_LRS), help="learning rates of the --tune grid"
    )
    args = parser.parse_args(argv)

    wall = time.perf_counter()
    study = quick_config() if args.quick else full_config()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        study = dataclasses.replace(study, seeds=args.seeds)
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # One thread per process: the tiny UNet's ops are too small to split, and on a shared
    # 2-core machine two threads per process oversubscribe it (measured 2-10x slower under load).
    torch.set_num_threads(1)
    try:
        return _run(args, study, jobs, output_dir, wall)
    finally:
        torch.set_num_threads(threads)


def _run(args, study: StudyConfig, jobs: int, output_dir: Path, wall: float) -> int:
    from tqdm.auto import tqdm

    bar = {}

    def world_progress(stage, done, total):
        if "world" not in bar:
            bar["world"] = tqdm(total=total, desc="pretraining the base model", unit="step", leave=False)
        bar["world"].update(1)

    world = tw.load_or_build(study.world, output_dir, progress=world_progress)
    if "world" in bar:
        bar["world"].close()

    if args.tune:
        betas, lrs, steps = tuple(args.tune_betas), tuple(args.tune_lrs), (study.steps,)
        n = len(betas) * len(lrs) * len(steps) * study.seeds
        with tqdm(total=n, desc="tuning DPO at 0 % flips", unit="run") as progress:
            rows = tune(world, study, output_dir, jobs, betas, lrs, steps, lambda r: progress.update(1))
        (output_dir / "tuning.json").write_text(
            json.dumps(_json_ready({"base_reward": world.base_reward["mean"], "grid": rows}), indent=1)
        )
        for row in rows:
            print(
                f"beta {row['beta']:g} lr {row['learning_rate']:g} steps {row['steps']}: reward {row['reward']:.4f} ± {row['reward_std']:.4f} (gain {row['gain']:+.4f}) {row['seconds']:.1f} s/run"
            )
        return 0

    specs = study_specs(study)
    with tqdm(total=len(specs), desc="demo runs", unit="run") as progress:
        records = run_all(specs, world, study, output_dir, jobs, lambda r: progress.update(1))
    results = summarize(records, world, study)
    results.update(
        quick=bool(args.quick),
        hyperparameters={
            "study": study.to_dict(),
            "methods": method_defaults(),
            "jobs": jobs,
            "eval_noise_seed": 12345,
        },
        machine=machine(),
        torch=torch.__version__,
        diffusers=__import__("diffusers").__version__,
        world_cache=str(world.path),
        world_build_seconds=world.built_seconds,
        run_seconds_total=float(sum(r["seconds"] for r in records)),
        runs=[{k: v for k, v in r.items() if k not in ("u", "weight", "flipped", "member")} for r in records],
    )
    results["plots"] = write_plots(results, output_dir)
    results["wall_seconds"] = time.perf_counter() - wall
    table = markdown(results)
    header = (
        f"# fastpref demo\n\n`fastpref demo{' --quick' if args.quick else ''}` on {results['machine']['cpu'] or results['machine']['platform']} "
        f"({results['machine']['cpu_count']} cores), torch {results['torch']}, {results['wall_seconds']:.0f} s wall.\n\n"
    )
    (output_dir / "results.md").write_text(header + table)
    (output_dir / "results.json").write_text(json.dumps(_json_ready(results), indent=1))
    print(table)
    print(
        f"wrote {output_dir / 'results.json'}, {output_dir / 'results.md'} and {', '.join(results['plots'])} in {results['wall_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
