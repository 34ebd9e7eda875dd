"""The design of the ``fastpref demo`` study: its arms (methods, label-flip rates, the learning-curve
arms, the ablations of u, DeDPO's label sources and propensities) with their display names, its
size and the baseline's hyper-parameters (:class:`StudyConfig`), and the method
hyper-parameters every run shares. docs/demo.md records how they were chosen."""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from .world import WorldConfig

FLIP_RATES = (0, 20)  # 20 %: the rate of the paper's bars
# "oracle": DPO on the kept (unflipped) pairs only, in the same order with the flipped ones
# skipped, same seeds and noise: an upper bound no real method has (it knows which pairs were
# flipped). At 0 % flips it is DPO itself, so it runs only at the other rates.
METHODS = ("dpo", "adaptive", "robust", "oracle")
REAL_METHODS = METHODS[1:3]  # the methods compared with DPO and with the oracle
METHOD_NAMES = {
    "dpo": "DPO",
    "adaptive": "Adaptive-DPO",
    "robust": "Robust-DPO",
    "oracle": "Oracle (DPO on kept pairs; upper bound, no real method)",
}
SHORT_NAMES = {**METHOD_NAMES, "oracle": "Oracle"}  # for column heads and legends
ABLATION_RATE = 20
# The ablations of u (Adaptive-DPO at ABLATION_RATE, the headline budget): the TrainConfig
# fields each one changes. "4 x 8 pairs" is the local metric of 4 processes without
# --global_metric (u's batch statistics over 8 pairs), emulated by 4 accumulation micro-steps;
# the default (one process, 32 pairs) is the global metric.
ABLATIONS: Dict[str, dict] = {
    "k1 = 1": {"k1": 1.0},
    "k1 = 30": {"k1": 30.0},
    "rho = 5": {"rho": 5.0},
    "rho = 30": {"rho": 30.0},
    "EMA decays 0.99, 0.9": {"ema_decays": (0.99, 0.9)},
    "one EMA, decay 0.9999": {"ema_decays": (0.9999,)},
    "local metric, 4 x 8 pairs": {"gradient_accumulation_steps": 4},
}
ABLATION_DEFAULT = "defaults (k1 10, rho 15, EMA 0.9999, 0.5; global metric over 32 pairs)"
DEDPO_ARMS = ("human-only", "synthetic", "dedpo")
DEDPO_NAMES = {
    "human-only": "DPO, human-labelled pairs only",
    "synthetic": "DPO, judge's labels",
    "dedpo": "DeDPO (judge + human labels)",
    "all-human": "DPO, all-human labels (upper bound)",
}
# The grid the baseline (DPO at 0 % label flips) was tuned on (``fastpref demo --tune``).
TUNE_BETAS = (25.0, 50.0, 100.0, 250.0, 1000.0)
TUNE_LRS = (1e-4, 3e-4, 1e-3)
U_BINS = 10  # equal-count bins of u for the paper's Fig. 3
MIN_BIN_COUNT = 10  # u bins with fewer pairs are left out of the Fig. 3 plot
EVAL_NOISE_SEED = 12345  # the table's evaluation: every model sees the same noise
CURVE_NOISE_SEED = 54321  # the curves' (cheaper) evaluation: other noise, so the budget is not chosen on the table's


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The study's size and the baseline's hyper-parameters. The world, beta and learning rate
    were fixed on DPO at 0 % label flips only (beta 50: the paper's 1000 is for SD's 16384-dim
    latents and far too large for these 192-pixel ones); the step budget is where DPO's learning
    curve at 0 % label flips peaks (``fastpref demo --full`` measures it); every method then runs
    with the spec's default hyper-parameters (:func:`method_defaults`).

    Attributes:
        world: the toy world.
        seeds: training seeds 0 .. seeds-1 (each: noise draws, pair order, flipped pairs, human labels).
        extra_seeds: seeds of the secondary arms (the ablations of u, DeDPO).
        steps: the headline budget: optimizer steps of every table's run.
        batch_pairs: pairs per step.
        beta: fastpref's beta (z = beta * l, l a difference of per-sample mean squared errors).
        learning_rate: AdamW learning rate (constant), full fine-tune of the tiny UNet.
        curve_steps: length of the learning-curve runs (past DPO's over-optimization).
        curve_every: a curve point (and a window of u's diagnostics) every this many steps.
        curve_eval_samples: DDIM samples per held-out prompt at a curve point (the table uses the world's).
        propensities: shares of pairs with a human label in the DeDPO study (its propensity).
        judge_biased_colours: prompts on which the synthetic judge is systematically wrong.
    """

    world: WorldConfig
    seeds: int = 5
    extra_seeds: int = 5
    steps: int = 150
    batch_pairs: int = 32
    beta: float = 50.0
    learning_rate: float = 3e-4
    curve_steps: int = 300
    curve_every: int = 25
    curve_eval_samples: int = 4
    propensities: Tuple[float, ...] = (0.1, 0.3, 0.5)
    judge_biased_colours: Tuple[str, ...] = ("blue", "magenta")

    def __post_init__(self):
        for name in (
            "seeds",
            "extra_seeds",
            "steps",
            "batch_pairs",
            "curve_steps",
            "curve_every",
            "curve_eval_samples",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.curve_steps % self.curve_every or self.steps > self.curve_steps:
            raise ValueError(
                f"curve_steps ({self.curve_steps}) must be a multiple of curve_every ({self.curve_every}) "
                f"and >= steps ({self.steps})"
            )
        if self.batch_pairs % 4:
            raise ValueError(f"batch_pairs must be a multiple of 4 (the local-metric ablation), got {self.batch_pairs}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["world"] = self.world.to_dict()
        return out


def full_config() -> StudyConfig:
    """The study of ``fastpref demo`` (its core) and ``fastpref demo --full``."""
    return StudyConfig(world=WorldConfig())


def quick_config() -> StudyConfig:
    """``--quick``: the same study at CI size (a briefly pretrained world, few pairs and steps,
    two seeds so that paired intervals exist)."""
    world = WorldConfig(pretrain_steps=120, pretrain_batch=64, num_pairs=256, eval_samples=4, sample_steps=6)
    return StudyConfig(
        world=world, seeds=2, extra_seeds=2, steps=6, batch_pairs=16, curve_steps=8, curve_every=4, curve_eval_samples=2
    )


def method_defaults() -> dict:
    """The method hyper-parameters every run uses (the spec's / paper's defaults, unchanged):
    rho = 15, k1 = 10, k2 = -1/beta, c2 = the batch mean of l, EMA decays 0.9999 and 0.5,
    eps = 0.1 for Robust-DPO (at every label-flip rate, not the true rate)."""
    from ..train import TrainConfig

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
        "weighting_adaptive": "linear",
        "margin_adaptive": "quadratic",
        "max_grad_norm": default.max_grad_norm,
        "adam_weight_decay": default.adam_weight_decay,
        "lr_scheduler": "constant",
        "lora_rank": 0,
    }
