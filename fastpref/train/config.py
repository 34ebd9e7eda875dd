"""The trainer's settings: :class:`TrainConfig`, one dataclass whose fields carry their default,
choices and help text once. ``PreferenceTrainer`` reads it; ``fastpref train`` generates its
loss and optimization flags from it (``transformers.HfArgumentParser``)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import field
from typing import Literal, Optional, get_args

import fastpref

from .families import FAMILIES
from .families.sd3 import WEIGHTING_SCHEMES

# The trainer's objectives (--loss_type); each but sft is fastpref.adaptive_dpo_loss with one of the
# loss's per-pair heads (HEADS), whose names are fastpref.CHOICES["loss_type"].
OBJECTIVES = ("dpo", "adaptive", "ipo", "adaptive-ipo", "robust", "cdpo", "hinge", "sft", "dedpo")
# diffusers' train_diffusion_dpo.py names for fastpref's loss types (its hinge and ipo are fastpref's)
DIFFUSERS_LOSS_TYPES = {"sigmoid": "dpo"}
Objective = Literal[OBJECTIVES + tuple(DIFFUSERS_LOSS_TYPES)]
MixedPrecision = Literal["no", "fp16", "bf16"]
# The loss's own options, with the loss's choices (Literal of a tuple: the choices are written once,
# in fastpref.loss.options).
Weighting = Literal[fastpref.CHOICES["weighting"]]
Margin = Literal[fastpref.CHOICES["margin"]]
MetricPreset = Literal[fastpref.CHOICES["preset"]]
LossBackend = Literal[fastpref.CHOICES["backend"]]
WeightingScheme = Literal[WEIGHTING_SCHEMES]
MAX_SEQUENCE_LENGTH = 512  # T5's longest input in the SD3 and FLUX pipelines
# How the EMA footprints of the metric u are kept (docs/spec.md §9): "fastpref" (float32, the
# metric warm-up once per run) or "authors" (as the authors' dpo_train_un.py).
FootprintRecipe = Literal["fastpref", "authors"]

MIXED_PRECISION = get_args(MixedPrecision)
ADAPTIVE_TYPES = ("adaptive", "adaptive-ipo")
# objective -> the per-pair head of fastpref.adaptive_dpo_loss
HEADS = {
    "dpo": "sigmoid",
    "adaptive": "sigmoid",
    "ipo": "ipo",
    "adaptive-ipo": "ipo",
    "robust": "robust",
    "cdpo": "cdpo",
    "hinge": "hinge",
    "dedpo": "dedpo",
}
# TrainConfig's beta and k1 default to SD 1.5's (the Adaptive-DPO paper's per-model settings are
# each family's defaults; fastpref train takes them from the run's family).
_SD15 = FAMILIES["sd15"].defaults
# Integer settings and their least valid value.
_INT_BOUNDS = {
    "lora_rank": 0,
    "max_train_steps": 1,
    "gradient_accumulation_steps": 1,
    "lr_warmup_steps": 0,
    "lr_num_cycles": 1,
    "max_nonfinite_steps": 1,
}


class DecaysError(argparse.ArgumentTypeError, ValueError):
    """A value that is not a list of decays; argparse shows its message after the flag."""


class Decays(tuple):
    """EMA decays as a tuple of floats, from any iterable of numbers or from the command line's
    comma-separated form (``"0.9999,0.5"``; ``""`` for none)."""

    def __new__(cls, values=()):
        if isinstance(values, str):
            values = [value for value in values.split(",") if value.strip()]
        try:
            return super().__new__(cls, (float(value) for value in values))
        except (TypeError, ValueError):
            raise DecaysError(
                f"ema_decays must be comma-separated numbers such as 0.9999,0.5; got {values!r}"
            ) from None

    def __str__(self) -> str:
        return ",".join(str(value) for value in self)


def _help(text: str, **metadata) -> dict:
    return {"help": text, **metadata}


@dataclasses.dataclass
class TrainConfig:
    """Everything the training step needs; each field's ``help`` says what it does. Loss
    keywords follow ``fastpref.adaptive_dpo_loss``; a bad value raises ``ValueError`` naming the
    field when the config is built (the loss's own checks run here, not at the first batch)."""

    _argument_group_name = "training step (TrainConfig)"

    loss_type: Objective = field(
        default="adaptive",
        metadata=_help(
            "the objective: dpo, adaptive (Adaptive-DPO), ipo, adaptive-ipo, robust (rDPO), cdpo, hinge, "
            "sft (MSE on the preferred images only) or dedpo; diffusers' sigmoid is dpo"
        ),
    )
    beta: float = field(
        default=_SD15.beta,
        metadata=_help(
            "beta on diffusers' --beta_dpo scale (z = beta * l, l a difference of per-sample mean squared errors)",
            aliases=["--beta_dpo"],
        ),
    )
    rho: float = field(default=15.0, metadata=_help("scale of l inside the metric u"))
    k1: float = field(default=_SD15.k1, metadata=_help("weight strength of the metric u"))
    k2: Optional[float] = field(default=None, metadata=_help("margin slope; None: -1/beta"))
    c2: Optional[float] = field(default=None, metadata=_help("margin offset; None: the detached batch mean of l"))
    ipo_tau: Optional[float] = field(default=None, metadata=_help("tau of the IPO heads; None: beta"))
    weighting: Optional[Weighting] = field(
        default=None,
        metadata=_help(
            "W; None: linear for the adaptive types, none otherwise (a dedpo run may set it to compose with "
            "Adaptive-DPO); anything but none needs the EMA footprints"
        ),
    )
    margin: Optional[Margin] = field(
        default=None,
        metadata=_help("Gamma; None: quadratic for the adaptive types, none otherwise (as weighting)"),
    )
    metric_preset: MetricPreset = field(
        default="official",
        metadata=_help("u as the authors' code (official) or as the paper's equations print it (the loss's preset)"),
    )
    eps: float = field(
        default=0.1,
        metadata=_help("noise rate of robust / smoothing of cdpo", aliases=["--label_noise"]),
    )
    ema_decays: Decays = field(
        default=Decays((0.9999, 0.5)),
        metadata=_help(
            "comma-separated decays of the EMA footprints of the metric u, one footprint each (the authors'); "
            "used only when weighting or margin is on"
        ),
    )
    ema_warmup: bool = field(
        default=True,
        metadata=_help("diffusers EMAModel's decay schedule: update n >= 1 uses min(decay, (1+n)/(10+n))"),
    )
    metric_warmup_steps: Optional[int] = field(
        default=None,
        metadata=_help(
            "micro-steps with u := 0 (W = 1, Gamma = c2); None: 2 x gradient_accumulation_steps, the authors'"
        ),
    )
    footprint_recipe: FootprintRecipe = field(
        default="fastpref",
        metadata=_help(
            "fastpref: EMA footprints kept in float32 and the metric warm-up once per run; authors: as the "
            "authors' dpo_train_un.py, footprints stored and updated in the mixed-precision dtype (fp16/bf16) and "
            "the metric warm-up restarted at every epoch. The default keeps the footprints' small EMA steps, which "
            "fp16 rounds away (docs/spec.md §9)"
        ),
    )
    global_metric: bool = field(
        default=False,
        metadata=_help(
            "with several processes, compute the loss (u's batch statistics, c2, the mean) over the global batch "
            "instead of each process's (the authors' choice)"
        ),
    )
    lora_rank: int = field(
        default=8,
        metadata=_help("LoRA rank on the attention projections; 0 = full fine-tune", aliases=["--rank"]),
    )
    learning_rate: float = field(default=1e-5, metadata=_help("peak learning rate"))
    lr_scheduler: str = field(
        default="constant",
        metadata=_help(
            "diffusers' get_scheduler: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"
        ),
    )
    lr_warmup_steps: int = field(default=0, metadata=_help("warm-up steps of the LR schedule"))
    lr_num_cycles: int = field(default=1, metadata=_help("hard restarts of cosine_with_restarts"))
    lr_power: float = field(default=1.0, metadata=_help("power of the polynomial schedule"))
    max_train_steps: int = field(default=1000, metadata=_help("optimizer steps"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-steps per optimizer step"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0 = off)"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2"))
    adam_weight_decay: float = field(default=1e-2, metadata=_help("AdamW weight decay"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    use_8bit_adam: bool = field(default=False, metadata=_help("bitsandbytes' AdamW8bit instead of torch's AdamW"))
    mixed_precision: MixedPrecision = field(
        default="no", metadata=_help("autocast dtype; the frozen weights are stored in it")
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("trade compute for UNet activation memory"))
    fsdp: bool = field(
        default=False,
        metadata=_help(
            "full fine-tunes on several processes: shard the policy, its optimizer state, the reference and the EMA "
            "footprints with FSDP2 per block instead of replicating them (DDP); LoRA runs keep DDP"
        ),
    )
    seed: int = field(default=0, metadata=_help("seed of the model init, data order and noise"))
    max_nonfinite_steps: int = field(
        default=10,
        metadata=_help("abort after this many optimizer steps in a row with a non-finite loss"),
    )
    loss_backend: LossBackend = field(default="auto", metadata=_help("the loss's backend"))
    is_turbo: bool = field(
        default=False,
        metadata=_help(
            "SDXL Turbo, as diffusers' SDXL script: zero terminal SNR noise schedule, timesteps on its 4-step grid "
            "(249, 499, 749, 999 of 1000), validation with 4 steps and no guidance"
        ),
    )

    # -- flow-matching families (sd3, flux): diffusers' train_dreambooth_lora_sd3.py / _flux.py flags;
    # None: the family's default (its diffusers script's). Refused for the SD families.
    weighting_scheme: Optional[WeightingScheme] = field(
        default=None,
        metadata=_help(
            "flow families: the sigma density and loss weight (diffusers' names): logit_normal, mode, uniform with "
            "sigma_sqrt (w = sigma^-2) or cosmap weights, or none (uniform, w = 1); None: logit_normal (sd3), "
            "none (flux)"
        ),
    )
    logit_mean: Optional[float] = field(default=None, metadata=_help("flow families: logit_normal's mean (0)"))
    logit_std: Optional[float] = field(default=None, metadata=_help("flow families: logit_normal's std (1)"))
    mode_scale: Optional[float] = field(default=None, metadata=_help("flow families: the mode density's scale (1.29)"))
    precondition_outputs: Optional[int] = field(
        default=None,
        metadata=_help(
            "flow families: 1 maps the prediction to x0 = noisy - sigma * pred and regresses x0 (diffusers' SD3 "
            "script); 0 regresses the velocity noise - x0; None: 1 (sd3), 0 (flux)"
        ),
    )
    flow_shift: Optional[float] = field(
        default=None,
        metadata=_help("flow families: the flow-matching scheduler's shift of the sigmas; None: its config's"),
    )
    guidance_scale: Optional[float] = field(
        default=None,
        metadata=_help(
            "flux: the guidance embedding's value in training (guidance-distilled FLUX.1 dev) and at validation; "
            "None: 3.5 (diffusers' FLUX script)"
        ),
    )
    max_sequence_length: Optional[int] = field(
        default=None,
        metadata=_help(
            f"flow families: T5 tokens per caption, at most {MAX_SEQUENCE_LENGTH}; None: 77 (sd3), 512 (flux)"
        ),
    )

    def __post_init__(self):
        self.loss_type = DIFFUSERS_LOSS_TYPES.get(self.loss_type, self.loss_type)
        if self.loss_type not in OBJECTIVES:
            raise ValueError(f"loss_type must be one of {OBJECTIVES}, got {self.loss_type!r}")
        self.ema_decays = tuple(Decays(self.ema_decays))
        self._check_run_values()
        self._check_flow_values()
        if self.footprint_recipe not in get_args(FootprintRecipe):
            raise ValueError(
                f"footprint_recipe must be one of {get_args(FootprintRecipe)}, got {self.footprint_recipe!r}"
            )
        if self.fsdp and self.lora_rank > 0:
            raise ValueError("fsdp is for full fine-tunes (lora_rank 0); LoRA runs keep DDP")
        if self.metric_warmup_steps is not None and self.metric_warmup_steps < 0:
            raise ValueError(f"metric_warmup_steps must be >= 0, got {self.metric_warmup_steps}")
        if self.uses_footprints and not self.ema_decays:
            raise ValueError(
                f"loss_type {self.loss_type!r} with weighting/margin needs at least one EMA decay (ema_decays)"
            )
        if self.loss_type != "sft":  # fail now, not at the first batch: the loss module checks its keywords
            fastpref.AdaptiveDPOLoss(**self.loss_keywords(metric_on=True))

    def _check_run_values(self) -> None:
        """The checks of the fields :meth:`for_run` may set: the mixed precision, the integers,
        the learning rate."""
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        for name, least in _INT_BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be a {'positive' if least else 'non-negative'} int, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def _check_flow_values(self) -> None:
        """The flow-matching fields' values (whether the family takes them is checked at start-up)."""
        if self.weighting_scheme is not None and self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        if self.logit_std is not None and not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.precondition_outputs not in (None, 0, 1):
            raise ValueError(f"precondition_outputs must be 0 or 1, got {self.precondition_outputs!r}")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift}")
        length = self.max_sequence_length
        if length is not None and (not isinstance(length, int) or not 1 <= length <= MAX_SEQUENCE_LENGTH):
            raise ValueError(f"max_sequence_length must be an int in [1, {MAX_SEQUENCE_LENGTH}], got {length!r}")

    @property
    def flow_options_given(self) -> list:
        """The flow-matching fields this config sets (refused by the SD families)."""
        names = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")
        names += ("flow_shift", "guidance_scale", "max_sequence_length")
        return [name for name in names if getattr(self, name) is not None]

    def for_run(self, *, max_train_steps: int, learning_rate: float, mixed_precision: str) -> "TrainConfig":
        """A copy with the values only the run knows (the step count from the data, the scaled
        learning rate, accelerate's mixed precision); only those are checked again (the loss's
        keywords were checked when this config was built)."""
        out = copy.copy(self)
        out.max_train_steps, out.learning_rate, out.mixed_precision = max_train_steps, learning_rate, mixed_precision
        out._check_run_values()
        return out

    @property
    def resolved_weighting(self) -> str:
        if self.weighting is not None:
            return self.weighting
        return "linear" if self.loss_type in ADAPTIVE_TYPES else "none"

    @property
    def resolved_margin(self) -> str:
        if self.margin is not None:
            return self.margin
        return "quadratic" if self.loss_type in ADAPTIVE_TYPES else "none"

    @property
    def uses_footprints(self) -> bool:
        """Whether the loss needs u, hence the EMA footprints."""
        return self.loss_type != "sft" and (self.resolved_weighting != "none" or self.resolved_margin != "none")

    @property
    def warmup_micro_steps(self) -> int:
        return 2 * self.gradient_accumulation_steps if self.metric_warmup_steps is None else self.metric_warmup_steps

    def loss_keywords(self, metric_on: bool) -> dict:
        """Keywords of ``fastpref.adaptive_dpo_loss`` (without the per-batch tensors).
        ``metric_on=False`` is the warm-up: u := 0, i.e. W = 1 and Gamma = c2."""
        keywords = dict(
            beta=self.beta,
            rho=self.rho,
            k1=self.k1,
            k2=self.k2,
            c2=self.c2,
            ipo_tau=self.ipo_tau,
            preset=self.metric_preset,
            eps=self.eps,
            weighting=self.resolved_weighting,
            margin=self.resolved_margin,
            loss_type=HEADS[self.loss_type],
            backend=self.loss_backend,
        )
        if not metric_on:
            keywords.update(weighting="none", k2=0.0)  # u only enters through W and k2 * u^p
        return keywords
