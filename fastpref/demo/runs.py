"""The study's training runs: which runs there are (:class:`RunSpec`, the lists of
:func:`budget_specs`, :func:`core_specs`, :func:`full_specs`), the labelled data and batches of a
run, one run through :class:`fastpref.train.PreferenceTrainer` with its evaluations and u's
diagnostics (:func:`train_run`), and a pool of single-threaded worker processes."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..stats import auroc
from ..train import PairSampler, PreferenceTrainer, TrainConfig
from . import labels
from . import world as tw
from .config import (
    ABLATION_RATE,
    ABLATIONS,
    CURVE_NOISE_SEED,
    DEDPO_ARMS,
    EVAL_NOISE_SEED,
    FLIP_RATES,
    METHODS,
    StudyConfig,
)

# The per-pair arrays a record holds up to its table step: u's factors and W on the steps after
# the metric's warm-up (``flipped`` marks those pairs), and on every step the policy's l_theta,
# the gradient scale |dL/dy| and which of those pairs were flipped (``seen_flipped``).
METRIC_ARRAYS = ("u", "confidence", "stability", "weight", "flipped")
STEP_ARRAYS = ("l_theta", "grad_scale", "seen_flipped")
PER_PAIR = METRIC_ARRAYS + STEP_ARRAYS
RECORD_FORMAT = 2  # bump when a run's record changes: cached records of another format are not read


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: ``study`` in ``flip`` / ``dedpo`` / ``ablation`` / ``tune``.

    ``steps`` optimizer steps; the table's evaluation after ``table_step`` of them (None: none);
    with ``curve``, a cheap evaluation and a window of u's diagnostics every ``curve_every`` steps.
    ``variant``: the ablation's name, or DeDPO's propensity."""

    study: str
    method: str
    rate: int
    seed: int
    steps: int
    table_step: Optional[int] = None
    curve: bool = False
    variant: Optional[str] = None
    beta: Optional[float] = None  # tune: overrides
    learning_rate: Optional[float] = None


def budget_specs(study: StudyConfig) -> List[RunSpec]:
    """The runs that choose the headline budget: DPO's learning curves at 0 % label flips."""
    return [RunSpec("flip", "dpo", 0, seed, study.curve_steps, curve=True) for seed in range(study.seeds)]


def core_specs(study: StudyConfig, steps: int, rates: Sequence[int] = FLIP_RATES) -> List[RunSpec]:
    """The headline study: every method at every label-flip rate of ``rates``, ``steps`` each."""
    specs = [
        RunSpec("flip", method, rate, seed, steps, table_step=steps)
        for seed in range(study.seeds)
        for method in METHODS
        for rate in rates
        if not (method == "oracle" and rate == 0)  # the oracle at 0 % flips is DPO
    ]
    return _slow_first(specs)


def full_specs(study: StudyConfig, steps: int) -> List[RunSpec]:
    """``fastpref demo --full`` after the budget runs, most important first: the headline study,
    its runs continued to ``curve_steps`` as learning curves (DPO's at 0 % label flips are the
    budget runs); DeDPO at every propensity and the ablations of u (``extra_seeds`` seeds each).
    Every table's run takes ``steps``."""
    headline = []
    for spec in core_specs(study, steps):
        curve = not (spec.method == "dpo" and spec.rate == 0)
        headline.append(dataclasses.replace(spec, steps=study.curve_steps, curve=True) if curve else spec)
    dedpo, ablation = [], []
    for seed in range(study.extra_seeds):
        dedpo.append(RunSpec("dedpo", "synthetic", 0, seed, steps, table_step=steps))
        for propensity in study.propensities:
            for arm in DEDPO_ARMS[::2]:  # human-only, dedpo (the judge's labels do not depend on it)
                dedpo.append(RunSpec("dedpo", arm, 0, seed, steps, table_step=steps, variant=f"{propensity:g}"))
        for name in ABLATIONS:
            ablation.append(RunSpec("ablation", "adaptive", ABLATION_RATE, seed, steps, table_step=steps, variant=name))
    return _slow_first(headline) + dedpo + ablation


def _slow_first(specs: List[RunSpec]) -> List[RunSpec]:
    """Longest runs first (then the adaptive ones, which compute footprints), for a balanced pool."""
    return sorted(specs, key=lambda s: (-s.steps, s.method != "adaptive", s.seed))


def _loss_type(spec: RunSpec) -> str:
    if spec.study == "dedpo":
        return "dedpo" if spec.method == "dedpo" else "dpo"
    return "dpo" if spec.method == "oracle" else spec.method


def run_data(world: tw.World, spec: RunSpec, study: StudyConfig) -> Dict[str, torch.Tensor]:
    """The labelled data of a run over the world's pairs (stored winner first by the reward):

    ``indices`` int64 ``[M]`` (the pairs its order runs over), ``swap`` bool ``[N]`` (present the
    stored loser first), ``flipped`` bool ``[N]`` (the presented label disagrees with the reward),
    for the oracle ``keep`` bool ``[N]`` (it trains on the kept pairs only: the same order as DPO's
    with the flipped pairs skipped), and
    for DeDPO ``synthetic_label``, ``human_label``, ``human_mask``, ``propensity`` (``[N]``,
    relative to the presented order)."""
    pairs = world.pairs
    n = pairs["prompt"].shape[0]
    indices = torch.arange(n)
    out: Dict[str, torch.Tensor] = {}
    if spec.study in ("flip", "tune", "ablation"):
        swap = labels.flip_mask(n, spec.rate / 100.0, spec.seed)
    elif spec.study == "dedpo":
        judge, _ = labels.synthetic_judge(
            pairs, world.config, biased_colours=study.judge_biased_colours, seed=spec.seed
        )
        propensity = float(spec.variant) if spec.variant is not None else 0.0
        human = labels.flip_mask(n, propensity, spec.seed + 7_000_000)  # a separate seeded choice
        if spec.method == "human-only":
            swap = torch.zeros(n, dtype=torch.bool)
            indices = torch.nonzero(human).flatten()
        else:  # the judge orders every pair: its preferred image first
            swap = judge < 0.5
            if spec.method == "dedpo":
                out["synthetic_label"] = torch.where(swap, 1.0 - judge, judge)
                out["human_label"] = torch.where(human, (~swap).to(torch.float32), torch.full((n,), float("nan")))
                out["human_mask"] = human
                out["propensity"] = torch.full((n,), propensity)
    else:
        raise ValueError(f"unknown study {spec.study!r}")
    out.update(indices=indices, swap=swap, flipped=swap.clone())
    if spec.method == "oracle":
        out["keep"] = ~swap
    return out


def pair_order(data: Dict[str, torch.Tensor], seed: int) -> Iterator[int]:
    """The pairs a run trains on, in order: ``fastpref.train.PairSampler``'s seeded order over
    ``data["indices"]``, without the pairs ``data["keep"]`` leaves out (the oracle's flipped
    pairs): the oracle sees DPO's order with the flipped pairs skipped."""
    indices, keep = data["indices"], data.get("keep")
    for position in PairSampler(len(indices), seed=seed, infinite=True):
        index = int(indices[position])
        if keep is None or bool(keep[index]):
            yield index


def gradient_scale(config: TrainConfig, logs: dict) -> Optional[np.ndarray]:
    """|dL_j/dy_j| per pair (``y = beta * l_theta - Gamma``, spec §5), float64 ``[B]``: how hard
    the loss pushes on pair j. The sigmoid head (DPO, Adaptive-DPO, the oracle):
    ``W sigmoid(-y)``; Robust-DPO: ``W ((1 - eps) sigmoid(-y) + eps sigmoid(y)) / (1 - 2 eps)``;
    None for other heads."""
    l_theta = logs["l_theta"].double().cpu().numpy()
    y = config.beta * l_theta - logs["margin"].double().cpu().numpy()
    weight = logs["weight"].double().cpu().numpy()
    sigmoid = lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))  # noqa: E731 (stable for any finite x)
    if config.loss_type in ("dpo", "adaptive"):
        return weight * sigmoid(-y)
    if config.loss_type == "robust":
        eps = config.eps
        return weight * ((1 - eps) * sigmoid(-y) + eps * sigmoid(y)) / (1 - 2 * eps)
    return None


def debiased_labels(data: Dict[str, torch.Tensor]) -> torch.Tensor:
    """DeDPO's debiased label of every pair, float32 ``[N]``: ``yhat + m (y - yhat) / p`` (the
    judge's label ``yhat``, the human's ``y`` where ``m``, the propensity ``p``), its estimate of
    the probability that the presented first image is the better one."""
    yhat, m, p = data["synthetic_label"], data["human_mask"], data["propensity"]
    return yhat + torch.where(m, (data["human_label"] - yhat) / p, torch.zeros_like(yhat))


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


def train_config(spec: RunSpec, study: StudyConfig) -> TrainConfig:
    """The trainer's config of a run: the study's baseline, the spec's overrides, the ablation's fields."""
    fields = dict(
        loss_type=_loss_type(spec),
        beta=spec.beta or study.beta,
        learning_rate=spec.learning_rate or study.learning_rate,
        max_train_steps=spec.steps,
        lora_rank=0,
        seed=spec.seed,
        lr_scheduler="constant",
    )
    if spec.study == "ablation":
        fields.update(ABLATIONS[spec.variant])
    return TrainConfig(**fields)


def flipped_share(scale: np.ndarray, flipped: np.ndarray) -> Optional[float]:
    """The flipped pairs' share of the summed gradient scale ``sum_flipped / sum_all`` (None
    when the sum is 0)."""
    total = float(np.sum(scale))
    return float(np.sum(scale[np.asarray(flipped, dtype=bool)])) / total if total > 0 else None


def window_diagnostics(window: Dict[str, List[np.ndarray]], adaptive: bool) -> dict:
    """u's diagnostics over the pairs of a window of steps (every micro-batch pooled): implicit
    accuracy (``l_theta > 0``, ties one half) on kept and flipped pairs, the RMS of ``l_theta``
    (the scale u's normalisation divides out), the AUROC for flipped pairs of ``-l_theta`` (the
    policy's own ranking), the flipped pairs' share of the gradient scale, and for Adaptive-DPO
    the AUROC of u, c and s and mean u and W on kept and flipped pairs (steps after the metric's
    warm-up only). Absent values are None."""
    out: Dict[str, Optional[float]] = {}
    l_theta = np.concatenate(window["l_theta"])
    flipped = np.concatenate(window["flipped"]).astype(bool)
    accuracy = (l_theta > 0) + 0.5 * (l_theta == 0)
    out["implicit_acc_kept"] = float(accuracy[~flipped].mean()) if (~flipped).any() else None
    out["implicit_acc_flipped"] = float(accuracy[flipped].mean()) if flipped.any() else None
    out["l_rms"] = float(np.sqrt(np.mean(l_theta.astype(np.float64) ** 2)))
    both = flipped.any() and (~flipped).any()
    out["auroc_minus_l_flipped"] = auroc(-l_theta, flipped) if both else None
    if window["grad_scale"]:
        out["grad_share_flipped"] = flipped_share(np.concatenate(window["grad_scale"]), flipped)
    if adaptive and window["u"]:
        f = np.concatenate(window["metric_flipped"]).astype(bool)
        for name in ("u", "confidence", "stability"):
            values = np.concatenate(window[name])
            out[f"auroc_{name}_flipped"] = auroc(values, f) if f.any() and (~f).any() else None
        w = np.concatenate(window["weight"])
        for name, values in (("u", np.concatenate(window["u"])), ("weight", w)):
            out[f"{name}_kept"] = float(values[~f].mean()) if (~f).any() else None
            out[f"{name}_flipped"] = float(values[f].mean()) if f.any() else None
    return out


def train_run(world: tw.World, spec: RunSpec, study: StudyConfig) -> dict:
    """Train one run through :class:`fastpref.train.trainer.PreferenceTrainer` and evaluate it.

    Returns a record: the spec's fields; ``reward`` / ``per_colour`` (the table's evaluation,
    the world's ``eval_samples`` per held-out prompt, noise :data:`EVAL_NOISE_SEED`, after
    ``table_step`` steps; None without one), ``loss`` / ``implicit_acc`` over the last fifth of
    those steps, per-pair arrays ``u``, ``weight``, ``flipped``
    over the steps after the metric's warm-up up to ``table_step`` (runs with the metric;
    with ``confidence``, ``stability``), ``l_theta``, ``grad_scale``, ``seen_flipped`` over
    every step up to ``table_step`` (:data:`STEP_ARRAYS`), and
    with ``curve`` a list ``curve`` of points ``{"step", "reward"}`` (``curve_eval_samples`` per
    prompt, noise :data:`CURVE_NOISE_SEED`, step 0 = the base model) with
    :func:`window_diagnostics` of the steps since the last point; ``seconds`` (wall) and
    ``cpu_seconds``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    config = train_config(spec, study)
    trainer = PreferenceTrainer(world.base_unet(), tw.make_scheduler(), config)
    adaptive = trainer.footprints is not None
    data = run_data(world, spec, study)
    table = world.table
    micro_pairs = study.batch_pairs // config.gradient_accumulation_steps
    order = pair_order(data, spec.seed)
    curve_world = dataclasses.replace(world.config, eval_samples=study.curve_eval_samples)

    def curve_point(step: int) -> dict:
        return {"step": step, "reward": tw.evaluate(trainer.base_unet, curve_world, seed=CURVE_NOISE_SEED)["mean"]}

    record: dict = dataclasses.asdict(spec)
    record.update(beta=config.beta, learning_rate=config.learning_rate, reward=None, per_colour=None)
    collected: Dict[str, list] = {key: [] for key in PER_PAIR}
    tail: Dict[str, list] = {"loss": [], "implicit_acc": []}
    window_keys = ("l_theta", "flipped", "grad_scale", "u", "confidence", "stability", "weight", "metric_flipped")
    empty = lambda: {key: [] for key in window_keys}  # noqa: E731
    window = empty()
    curve = [curve_point(0)] if spec.curve else []
    for step in range(spec.steps):
        for _ in range(config.gradient_accumulation_steps):
            idx = torch.tensor([next(order) for _ in range(micro_pairs)])
            logs = trainer.train_step(make_batch(world, data, idx, table))
            before_table = spec.table_step is not None and step < spec.table_step
            flipped = logs["flipped"].cpu().numpy()
            per_step = {"l_theta": logs["l_theta"].float().cpu().numpy(), "seen_flipped": flipped}
            scale = gradient_scale(config, logs)
            if scale is not None:
                per_step["grad_scale"] = scale
                window["grad_scale"].append(scale)
            window["l_theta"].append(per_step["l_theta"])
            window["flipped"].append(flipped)
            if before_table:
                for key, values in per_step.items():
                    collected[key].append(values)
            if logs.get("metric_on"):
                metric = {key: logs[key].float().cpu().numpy() for key in METRIC_ARRAYS[:-1]}
                metric["flipped"] = flipped
                for key in METRIC_ARRAYS[:-1]:
                    window[key].append(metric[key])
                window["metric_flipped"].append(flipped)
                if before_table:
                    for key, values in metric.items():
                        collected[key].append(values)
            if spec.table_step is not None and spec.table_step - max(1, spec.table_step // 5) <= step < spec.table_step:
                tail["loss"].append(logs["loss"])
                tail["implicit_acc"].append(logs.get("implicit_acc", float("nan")))
        done = step + 1
        if done == spec.table_step:
            evaluation = tw.evaluate(trainer.base_unet, world.config, seed=EVAL_NOISE_SEED)
            record.update(reward=evaluation["mean"], per_colour=evaluation["per_colour"])
            record["loss"] = float(np.mean(tail["loss"]))
            record["implicit_acc"] = float(np.nanmean(tail["implicit_acc"]))
            if spec.study == "dedpo" and spec.method == "dedpo":
                record["label_estimator"] = label_estimator(world, data)
        if spec.curve and done % study.curve_every == 0:
            curve.append({**curve_point(done), **window_diagnostics(window, adaptive)})
            window = empty()
    if spec.curve:
        record["curve"] = curve
    for key in PER_PAIR:
        record[key] = np.concatenate(collected[key]) if collected[key] else None
    record["skipped_steps"] = trainer.skipped_steps
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu_start  # this process's CPU time: less sensitive to load
    return record


def label_estimator(world: tw.World, data: Dict[str, torch.Tensor]) -> dict:
    """DeDPO's debiased labels against the truth (1 where the presented first image is the
    reward's winner): their mean error (bias) and RMS error over the pairs, and the judge's."""
    truth = (~data["swap"]).to(torch.float32)
    debiased = debiased_labels(data)
    judge = data["synthetic_label"]
    return {
        "debiased_mean_error": float((debiased - truth).mean()),
        "debiased_rms_error": float((debiased - truth).pow(2).mean().sqrt()),
        "judge_mean_error": float((judge - truth).mean()),
        "judge_rms_error": float((judge - truth).pow(2).mean().sqrt()),
    }


# -- process pool ---------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(world_config: tw.WorldConfig, cache_dir: str, study: StudyConfig) -> None:
    torch.set_num_threads(1)  # one thread per process: see fastpref.demo.study.main
    _WORKER["world"] = tw.load_or_build(world_config, cache_dir)
    _WORKER["study"] = study


def _worker_run(spec: RunSpec) -> dict:
    return train_run(_WORKER["world"], spec, _WORKER["study"])


def record_file(cache_dir: Path, world: tw.World, spec: RunSpec, study: StudyConfig) -> Path:
    """Where a run's record is cached: ``cache_dir/records/<hash>.pt``, the hash of everything the
    record depends on (the world's key, the spec, the study's fields a run reads, :data:`RECORD_FORMAT`)."""
    import hashlib
    import json

    fields = ("batch_pairs", "beta", "learning_rate", "curve_every", "curve_eval_samples", "judge_biased_colours")
    key = {"format": RECORD_FORMAT, "world": world.config.key(), "spec": dataclasses.asdict(spec)}
    key.update({name: getattr(study, name) for name in fields})
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "records" / f"{digest}.pt"


def run_all(
    specs: Sequence[RunSpec], world: tw.World, study: StudyConfig, cache_dir: Path, jobs: int, progress=None
) -> List[dict]:
    """Run every spec (in ``jobs`` single-threaded processes when ``jobs > 1``, else here);
    returns the records in the order of ``specs``. Each record is cached in ``cache_dir`` as it
    finishes (:func:`record_file`), and a cached one is read instead of rerunning the spec, so an
    interrupted study resumes where it stopped."""
    from ..files import write_atomic

    records: List[Optional[dict]] = [None] * len(specs)
    files = [record_file(cache_dir, world, spec, study) for spec in specs]
    todo = []
    for i, file in enumerate(files):
        if file.exists():
            records[i] = torch.load(file, weights_only=False)
            if progress is not None:
                progress(records[i])
        else:
            todo.append(i)

    def finish(i: int, record: dict) -> None:
        files[i].parent.mkdir(parents=True, exist_ok=True)
        write_atomic(files[i], lambda tmp: torch.save(record, tmp))
        records[i] = record
        if progress is not None:
            progress(record)

    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            finish(i, train_run(world, specs[i], study))
        return records  # type: ignore[return-value]
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_init, initargs=(world.config, str(cache_dir), study)
    ) as pool:
        futures = {pool.submit(_worker_run, specs[i]): i for i in todo}
        for future in concurrent.futures.as_completed(futures):
            finish(futures[future], future.result())
    return records  # type: ignore[return-value]
