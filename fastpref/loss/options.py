"""The loss's options and argument checks (docs/spec.md §7), shared by every backend: the option
enums, ``make_config`` (scalar keywords -> :class:`LossConfig`) and ``make_inputs`` (tensors ->
:class:`LossInputs`), run once per call before any kernel launch.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

# The string options of the public API. A choice is a member's name in lower case; its value is
# the code the fused kernels read (the ``modes`` op argument; the Triton kernels' constexprs and
# csrc/common/options.h hold the same values).


class Preset(IntEnum):
    """``preset``: how the metric u reads the stacked l (docs/spec.md §3)."""

    OFFICIAL = 0
    PAPER = 1


class Weighting(IntEnum):
    """``weighting``: the weight W (docs/spec.md §4)."""

    LINEAR = 0
    SQUARE = 1
    SQRT = 2
    SIGMOID = 3
    NONE = 4


class Margin(IntEnum):
    """``margin``: the margin Gamma (docs/spec.md §4)."""

    QUADRATIC = 0
    LINEAR = 1
    NONE = 2


class LossType(IntEnum):
    """``loss_type``: the per-pair loss (docs/spec.md §5, §5b)."""

    SIGMOID = 0
    IPO = 1
    HINGE = 2
    ROBUST = 3
    CDPO = 4
    DEDPO = 5


class Reduction(IntEnum):
    """``reduction``: how the per-pair losses combine (docs/spec.md §5)."""

    MEAN = 0
    SUM = 1
    NONE = 2


# The positional arguments of the fused ops (csrc/common/options.h mirrors both enums).


class SettingSlot(IntEnum):
    """Position of each scalar in the fused ops' ``settings`` argument."""

    BETA = 0
    RHO = 1
    K1 = 2
    K2 = 3
    C2 = 4  # NaN when c2 is the batch mean of l_theta
    EPS = 5
    TAU = 6


class ModeSlot(IntEnum):
    """Position of each option's code in the fused ops' ``modes`` argument; a member's name in
    lower case is the option's keyword."""

    PRESET = 0
    WEIGHTING = 1
    MARGIN = 2
    LOSS_TYPE = 3
    REDUCTION = 4


_OPTION_AT_SLOT = {
    ModeSlot.PRESET: Preset,
    ModeSlot.WEIGHTING: Weighting,
    ModeSlot.MARGIN: Margin,
    ModeSlot.LOSS_TYPE: LossType,
    ModeSlot.REDUCTION: Reduction,
}
# The option enums in ``ModeSlot`` order: ``MODE_OPTIONS[slot]`` is the option at ``slot``.
MODE_OPTIONS = tuple(_OPTION_AT_SLOT[slot] for slot in ModeSlot)


def choices(option) -> Tuple[str, ...]:
    """The string choices of an option enum, in code order."""
    return tuple(member.name.lower() for member in option)


PRESETS = choices(Preset)
WEIGHTINGS = choices(Weighting)
MARGINS = choices(Margin)
LOSS_TYPES = choices(LossType)
REDUCTIONS = choices(Reduction)
BACKENDS = ("auto", "native", "triton", "torch")  # "auto" tries the others in this order
# Deprecated backend names, accepted with a FutureWarning until the next release removes them.
BACKEND_ALIASES = MappingProxyType({"cpp": "native"})
# The string choices of each option keyword of the public API (``fastpref.CHOICES``), for callers
# that build their own interface over the loss, such as ``fastpref train``'s flags.
CHOICES = MappingProxyType(
    {
        "preset": PRESETS,
        "weighting": WEIGHTINGS,
        "margin": MARGINS,
        "loss_type": LOSS_TYPES,
        "reduction": REDUCTIONS,
        "backend": BACKENDS,
    }
)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max
BACKEND_ENV = "FASTPREF_BACKEND"
DEDPO_ARGS = ("synthetic_label", "human_label", "human_mask", "propensity")


@dataclass(frozen=True)
class LossConfig:
    """Validated scalar settings of one loss call (docs/spec.md §3-§5). ``k2`` and ``tau`` are resolved;
    ``c2`` stays ``None`` when it is the batch mean of ``l_theta``. ``settings`` and ``modes`` are
    the fused ops' arguments, made once: ``settings[slot]`` for each ``SettingSlot`` (c2 = NaN
    when it is the batch mean), ``modes[slot]`` the code of each ``ModeSlot``'s option."""

    beta: float
    rho: float
    k1: float
    k2: float
    c2: Optional[float]
    preset: str
    weighting: str
    margin: str
    loss_type: str
    eps: float
    tau: float
    reduction: str
    settings: Tuple[float, ...]
    modes: Tuple[int, ...]
    # The ValueError message when a scalar the loss uses overflows float32 (None when all fit):
    # finite as Python floats, they must also be finite in the accumulation dtype, which only the
    # inputs give (``make_inputs`` raises it for a float32 accumulation).
    float32_error: Optional[str] = None


class LossInputs(NamedTuple):
    """Validated tensors of one call (immutable; a named tuple because it is built on every
    call's path and a frozen dataclass takes twice as long to construct).

    ``model_pred``/``ref_pred``: ``[2B, *S]``; ``target``: ``[B, *S]`` (shared by both halves) or
    ``[2B, *S]``; ``ema_preds``: a tuple of K tensors ``[2B, *S]`` (views of a stacked input, never
    copies); ``soft_label``: the DeDPO label ``y~`` ``[B]`` in ``acc_dtype``, else ``None``.
    """

    model_pred: torch.Tensor
    ref_pred: torch.Tensor
    target: torch.Tensor
    ema_preds: tuple
    soft_label: Optional[torch.Tensor]
    batch: int  # B, the number of pairs
    features: int  # D = prod(S)
    acc_dtype: torch.dtype  # float64 if any input is float64, else float32

    @property
    def device(self) -> torch.device:
        return self.model_pred.device

    @property
    def shared_target(self) -> bool:
        return self.target.shape[0] == self.batch

    def tensors(self):
        """Every prediction and the target, for dtype/device questions."""
        return (self.model_pred, self.ref_pred, self.target) + self.ema_preds


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of docs/spec.md §1: float64 when any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    return float(value)


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {value.dtype}")
    return value


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised here that names the first caller outside ``fastpref``."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def check_backend(name: str, value) -> str:
    """``value`` of the backend argument ``name`` (``backend`` or ``$FASTPREF_BACKEND``) as one of
    ``BACKENDS``; a deprecated alias (``BACKEND_ALIASES``) maps to its new name with a FutureWarning."""
    if isinstance(value, str) and value in BACKEND_ALIASES:
        new = BACKEND_ALIASES[value]
        if not torch.compiler.is_compiling():
            warnings.warn(
                f"{name}={value!r} is deprecated and will be removed in the next release; use {new!r}",
                FutureWarning,
                stacklevel=_user_stacklevel(),
            )
        return new
    return check_choice(name, value, BACKENDS)


def resolve_backend_name(backend) -> str:
    """The backend a call asked for: ``backend``, or ``$FASTPREF_BACKEND`` when it is ``"auto"``."""
    backend = check_backend("backend", backend)
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV)
        if override:
            backend = check_backend(BACKEND_ENV, override)
    return backend


CONFIG_KEYS = (
    "beta",
    "rho",
    "k1",
    "k2",
    "c2",
    "preset",
    "weighting",
    "margin",
    "loss_type",
    "eps",
    "ipo_tau",
    "reduction",
)


def make_config(*, beta, rho, k1, k2, c2, preset, weighting, margin, loss_type, eps, ipo_tau, reduction) -> LossConfig:
    """Check the scalar keywords of docs/spec.md §8 (their defaults live in the public signature,
    ``fastpref.loss.api``) and resolve ``k2 = -1/beta`` and ``tau = beta`` (docs/spec.md §4)."""
    beta = _check_real("beta", beta)
    if not beta > 0 or math.isinf(beta):
        raise ValueError(f"beta must be a finite number > 0; got {beta}")
    rho = _check_real("rho", rho)
    if not rho > 0 or math.isinf(rho):
        raise ValueError(f"rho must be a finite number > 0; got {rho}")
    k1 = _check_real("k1", k1)
    if not k1 >= 0 or math.isinf(k1):
        raise ValueError(f"k1 must be a finite number >= 0; got {k1}")
    k2_note = " (k2 = -1/beta by default)" if k2 is None else ""
    k2 = -1.0 / beta if k2 is None else _check_real("k2", k2)
    if not math.isfinite(k2):
        raise ValueError(f"k2 must be finite; got {k2}")
    if c2 is not None:
        c2 = _check_real("c2", c2)
        if not math.isfinite(c2):
            raise ValueError(f"c2 must be finite (or None for the batch mean of l_theta); got {c2}")
    eps = _check_real("eps", eps)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must lie in [0, 0.5); got {eps}")
    tau = beta if ipo_tau is None else _check_real("ipo_tau", ipo_tau)
    if not tau > 0 or math.isinf(tau):
        raise ValueError(f"ipo_tau (tau) must be a finite number > 0; got {tau}")
    chosen = {
        ModeSlot.PRESET: check_choice("preset", preset, PRESETS),
        ModeSlot.WEIGHTING: check_choice("weighting", weighting, WEIGHTINGS),
        ModeSlot.MARGIN: check_choice("margin", margin, MARGINS),
        ModeSlot.LOSS_TYPE: check_choice("loss_type", loss_type, LOSS_TYPES),
        ModeSlot.REDUCTION: check_choice("reduction", reduction, REDUCTIONS),
    }
    # In float32 (the accumulation dtype unless an input is float64) the kernels and the reference
    # would turn a larger scalar into inf. k2 and c2 matter only where the margin uses them (the
    # default k2 = -1/beta overflows for a tiny beta, which Diffusion-DPO's margin="none" never reads).
    scalars = [("beta", beta, ""), ("rho", rho, ""), ("k1", k1, "")]
    if chosen[ModeSlot.MARGIN] != "none":
        scalars += [("k2", k2, k2_note), ("c2", c2, "")]
    scalars.append(("ipo_tau", tau, ""))
    settings = {
        SettingSlot.BETA: beta,
        SettingSlot.RHO: rho,
        SettingSlot.K1: k1,
        SettingSlot.K2: k2,
        SettingSlot.C2: math.nan if c2 is None else c2,
        SettingSlot.EPS: eps,
        SettingSlot.TAU: tau,
    }
    return LossConfig(
        beta=beta,
        rho=rho,
        k1=k1,
        k2=k2,
        c2=c2,
        preset=chosen[ModeSlot.PRESET],
        weighting=chosen[ModeSlot.WEIGHTING],
        margin=chosen[ModeSlot.MARGIN],
        loss_type=chosen[ModeSlot.LOSS_TYPE],
        eps=eps,
        tau=tau,
        reduction=chosen[ModeSlot.REDUCTION],
        # dict lookups: indexing a sequence with an IntEnum makes torch.compile (2.13) recurse forever
        settings=tuple(settings[slot] for slot in SettingSlot),
        modes=tuple(_OPTION_AT_SLOT[slot][chosen[slot].upper()].value for slot in ModeSlot),
        float32_error=_float32_error(scalars),
    )


def _float32_error(scalars) -> Optional[str]:
    """The message for the first ``(name, value, note)`` whose finite float ``value`` overflows
    float32 (``|value| > FLOAT32_MAX``), or ``None``; a ``None`` value (c2) fits."""
    for name, value, note in scalars:
        if value is not None and abs(value) > FLOAT32_MAX:
            return (
                f"{name} must be finite in the accumulation dtype float32 (|{name}| <= {FLOAT32_MAX:.4e}); "
                f"got {value!r}{note}"
            )
    return None


def _is_float_tensor(value) -> bool:
    """What ``_check_tensor`` accepts; the hot path asks this and formats a name only on failure."""
    return isinstance(value, torch.Tensor) and value.dtype in FLOAT_DTYPES


def _split_ema_preds(ema_preds, model_pred: torch.Tensor) -> tuple:
    """Normalize ``ema_preds`` to a tuple of ``[2B, *S]`` tensors (views, no copy)."""
    if ema_preds is None:
        return ()
    if isinstance(ema_preds, torch.Tensor):
        _check_tensor("ema_preds", ema_preds)
        if ema_preds.dim() != model_pred.dim() + 1 or tuple(ema_preds.shape[1:]) != tuple(model_pred.shape):
            raise ValueError(
                "ema_preds as one tensor must be stacked [K, 2B, *S] = [K, "
                f"{', '.join(map(str, model_pred.shape))}]; got {list(ema_preds.shape)} "
                "(pass a list for separate tensors)"
            )
        return tuple(ema_preds.unbind(0))
    if not isinstance(ema_preds, (list, tuple)):
        raise TypeError(
            f"ema_preds must be a list/tuple of tensors or one [K, 2B, *S] tensor; got {type(ema_preds).__name__}"
        )
    shape = model_pred.shape
    for k, pred in enumerate(ema_preds):
        if not _is_float_tensor(pred):
            _check_tensor(f"ema_preds[{k}]", pred)  # raises, naming the argument
        if pred.shape != shape:
            raise ValueError(f"ema_preds[{k}] must have model_pred's shape {list(shape)}; got {list(pred.shape)}")
    return tuple(ema_preds)


def _pair_tensor(name: str, value, batch: int, device, dtype) -> torch.Tensor:
    """A DeDPO input given as a float (or bool) or a ``[B]`` tensor, as a ``[B]`` tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must be a float or a [B] = [{batch}] tensor; got shape {list(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but model_pred is on {device}")
        return value.to(dtype).expand(batch)
    if isinstance(value, numbers.Real):
        return torch.full((batch,), float(value), dtype=dtype, device=device)
    raise TypeError(f"{name} must be a float or a [B] tensor; got {type(value).__name__}")


def _dedpo_soft_label(labels: dict, batch: int, device, dtype) -> torch.Tensor:
    """``y~ = yhat + (R / pi) * (y - yhat)`` of docs/spec.md §5b, after its value checks."""
    missing = [name for name in DEDPO_ARGS if labels[name] is None]
    if missing:
        raise ValueError(f"{missing[0]} is required with loss_type='dedpo' (missing: {', '.join(missing)})")
    yhat = _pair_tensor("synthetic_label", labels["synthetic_label"], batch, device, dtype)
    human = _pair_tensor("human_label", labels["human_label"], batch, device, dtype)
    mask = _pair_tensor("human_mask", labels["human_mask"], batch, device, dtype)
    pi = _pair_tensor("propensity", labels["propensity"], batch, device, dtype)
    # NaN labels pass these checks on purpose: non-finite inputs must reach the loss (docs/spec.md §7).
    if bool(((yhat < 0) | (yhat > 1)).any()):
        raise ValueError("synthetic_label must lie in [0, 1]")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("human_mask must be boolean (True where pair j has a human label)")
    if bool(((pi <= 0) | (pi > 1)).any()):
        raise ValueError("propensity must lie in (0, 1]")
    labelled = mask == 1
    if bool((labelled & (human != 0) & (human != 1)).any()):
        raise ValueError("human_label must be 0 or 1 on every pair where human_mask is True")
    correction = torch.where(labelled, (human - yhat) / pi, torch.zeros_like(yhat))
    return yhat + correction


def make_inputs(model_pred, ref_pred, target, ema_preds, config: LossConfig, labels: dict) -> LossInputs:
    """Check the tensors of a call against each other (docs/spec.md §1, §7) and against ``config``;
    a malformed call raises ``ValueError`` or ``TypeError`` whose message starts with the
    argument's name. Only shapes, dtypes and devices are read, except by the DeDPO label checks
    (docs/spec.md §5b), whose contract is about values. On every call's path: each tensor
    property is read once, and argument names are formatted only for an error message."""
    _check_tensor("model_pred", model_pred)
    _check_tensor("ref_pred", ref_pred)
    _check_tensor("target", target)
    shape = model_pred.shape
    if len(shape) < 2:
        raise ValueError(f"model_pred must have at least 2 dims [2B, *S]; got shape {list(shape)}")
    rows = shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"model_pred's batch 2B must be even and > 0 (winners then losers); got {rows}")
    batch = rows // 2
    if ref_pred.shape != shape:
        raise ValueError(f"ref_pred must have model_pred's shape {list(shape)}; got {list(ref_pred.shape)}")
    target_shape = target.shape
    if len(target_shape) != len(shape) or target_shape[1:] != shape[1:] or target_shape[0] not in (batch, rows):
        raise ValueError(
            f"target must be [2B, *S] or [B, *S] with B = {batch}, S = {list(shape[1:])}; got {list(target_shape)}"
        )
    emas = _split_ema_preds(ema_preds, model_pred)
    # One pass over the other tensors: same device as model_pred, and the accumulation dtype of
    # docs/spec.md §1 (float64 when any input is float64; dtypes are singletons, so `is` compares them).
    device = model_pred.device
    any_f64 = model_pred.dtype is torch.float64
    for index, tensor in enumerate((ref_pred, target) + emas):
        if tensor.device != device:
            name = ("ref_pred", "target")[index] if index < 2 else f"ema_preds[{index - 2}]"
            raise ValueError(f"{name} is on {tensor.device} but model_pred is on {device}")
        any_f64 = any_f64 or tensor.dtype is torch.float64
    features = model_pred.numel() // rows  # prod(S)
    if features == 0:
        raise ValueError(f"model_pred must have D = prod(S) > 0; got shape {list(shape)}")
    acc = torch.float64 if any_f64 else torch.float32
    if config.float32_error is not None and not any_f64:
        raise ValueError(config.float32_error)

    if config.loss_type == "dedpo":
        soft_label = _dedpo_soft_label(labels, batch, device, acc)
    else:
        soft_label = None
        for name in DEDPO_ARGS:
            if labels.get(name) is not None:
                raise ValueError(f"{name} is only used with loss_type='dedpo'; got loss_type={config.loss_type!r}")
    return LossInputs(
        model_pred=model_pred,
        ref_pred=ref_pred,
        target=target,
        ema_preds=emas,
        soft_label=soft_label,
        batch=batch,
        features=features,
        acc_dtype=acc,
    )
