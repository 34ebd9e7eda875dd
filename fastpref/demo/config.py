"""The design of the ``fastpref demo`` study: its arms (methods, flip rates, DeDPO label sources)
with their display names, its size and the baseline's hyper-parameters (:class:`StudyConfig`),
and the method hyper-parameters every run shares. docs/demo.md records how they were chosen."""

from __future__ import annotations

import dataclasses
from typing import Tuple

from .world import WorldConfig

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
# The grid the baseline (DPO at 0 % flips) was tuned on (``fastpref demo --tune``).
TUNE_BETAS = (25.0, 50.0, 100.0, 250.0, 1000.0)
TUNE_LRS = (1e-4, 3e-4, 1e-3)
U_BINS = 10  # equal-count bins of u for the paper's Fig. 3
MIN_BIN_COUNT = 10  # u bins with fewer pairs are left out of the Fig. 3 plot


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The study's size and the baseline's hyper-parameters. The world, beta, learning rate,
    batch and step budget were fixed on DPO at 0 % flips only (beta 50: the paper's 1000 is for
    SD's 16384-dim latents and far too large for these 192-pixel ones); every method then runs
    with the spec's default hyper-parameters (:func:`method_defaults`).

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

    world: WorldConfig
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
    return StudyConfig(world=WorldConfig(), seeds=seeds)


def quick_config(seeds: int = 1) -> StudyConfig:
    """``--quick``: the same study at CI size (a briefly pretrained world, few pairs and steps)."""
    world = WorldConfig(pretrain_steps=120, pretrain_batch=64, num_pairs=256, eval_samples=4, sample_steps=6)
    return StudyConfig(world=world, seeds=seeds, steps=10, batch_pairs=16)


def method_defaults() -> dict:
    """The method hyper-parameters every run uses (the spec's / paper's defaults, unchanged):
    rho = 15, k1 = 10, k2 = -1/beta, c2 = the batch mean of l, EMA decays 0.9999 and 0.5,
    eps = 0.1 for Robust-DPO (at every flip rate, not the true rate), tau = beta for IPO."""
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
        "ipo_tau": "beta",
        "weighting_adaptive": "linear",
        "margin_adaptive": "quadratic",
        "max_grad_norm": default.max_grad_norm,
        "adam_weight_decay": default.adam_weight_decay,
        "lr_scheduler": "constant",
        "lora_rank": 0,
    }
