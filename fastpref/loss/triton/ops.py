"""The ``"triton"`` backend: launch code of the kernels in ``kernels`` and the two
``torch.library`` custom ops, tied together by ``fastpref.loss.autograd``. With
``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter (slow: for
tests with tiny shapes).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import autograd
from ..options import LossConfig, LossInputs, ModeSlot, Reduction, SettingSlot, acc_dtype
from . import kernels as K

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    """Tiling of a ``[2B, D]`` pass: programs cover ``chunk_size`` columns in ``block`` steps."""

    block: int
    chunk_size: int
    n_chunks: int


# 1024 columns x (K+2) x 2 fp32 accumulators keeps K <= 2 in registers at 4 warps.
GPU_MAX_BLOCK = 1024


def gpu_block(features: int) -> int:
    """The ``BLOCK`` of the error and gradient passes on a GPU for rows of ``features`` columns."""
    return min(triton.next_power_of_2(features), GPU_MAX_BLOCK)


def launch_config(features: int, batch: int, device: torch.device) -> LaunchConfig:
    """Fixed heuristic (no autotuning): on a GPU, split D into chunks so that about four
    programs per SM are in flight; under the interpreter, one big block per row."""
    if device.type != "cuda":
        block = min(triton.next_power_of_2(features), 8192)
        return LaunchConfig(block=block, chunk_size=triton.cdiv(features, block) * block, n_chunks=1)
    block = gpu_block(features)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted_chunks = max(1, min(triton.cdiv(4 * sms, batch), triton.cdiv(features, block)))
    chunk_size = triton.cdiv(triton.cdiv(features, wanted_chunks), block) * block
    return LaunchConfig(block=block, chunk_size=chunk_size, n_chunks=triton.cdiv(features, chunk_size))


# ---------------------------------------------------------------------------------------------
# Specializations: what one launch compiles, decided here for the launchers below and enumerated
# by launchable_specializations (the ahead-of-time compile check, tests/loss/test_triton_compile.py,
# and benchmarks/triton_compile.py compile that set for sm_80 and sm_90).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: the dtypes of its pointer arguments (every other
    non-constexpr argument is an integer), its constexpr arguments and its launch options
    (``num_warps``...; Triton's defaults where absent)."""

    kernel: str  # a kernel's name in fastpref.loss.triton.kernels
    pointers: Tuple[Tuple[str, torch.dtype], ...]
    constexprs: Tuple[Tuple[str, object], ...]
    options: Tuple[Tuple[str, int], ...] = ()

    @functools.cached_property
    def launch_keywords(self) -> dict:
        """The keyword arguments of the launch: constexprs and options (computed once)."""
        return {name: _tl_value(value) for name, value in self.constexprs} | dict(self.options)

    @property
    def label(self) -> str:
        dtypes = ",".join(f"{name}={str(dtype).replace('torch.', '')}" for name, dtype in self.pointers)
        consts = ",".join(f"{name}={_label_value(value)}" for name, value in self.constexprs)
        return f"{self.kernel}[{consts}]({dtypes})"


def _tl_value(value):
    """A constexpr as the launch takes it: a torch dtype (the accumulation dtype) as Triton's."""
    return _TL_DTYPES[value] if isinstance(value, torch.dtype) else value


def _label_value(value) -> str:
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else str(int(value))


def slot_groups(num_preds: int) -> List[Tuple[int, int]]:
    """``(first model index, number of slots)`` of each launch of the error kernel for
    ``num_preds`` predictions (policy, reference, K EMAs), ``K.MAX_SLOTS`` per launch."""
    return [(base, min(K.MAX_SLOTS, num_preds - base)) for base in range(0, num_preds, K.MAX_SLOTS)]


@functools.lru_cache(maxsize=1024)
def errors_specialization(slot_dtypes, target_dtype, shared_target: bool, block: int, acc) -> Specialization:
    """The error kernel for one group of predictions of ``slot_dtypes`` (a tuple); unused slots
    repeat slot 0. The three ``*_specialization`` functions are memoized: they run at every launch."""
    dtypes = slot_dtypes + (slot_dtypes[0],) * (K.MAX_SLOTS - len(slot_dtypes))
    pointers = (("partial_ptr", acc), ("target_ptr", target_dtype)) + tuple(
        (f"p{slot}", dtype) for slot, dtype in enumerate(dtypes)
    )
    constexprs = (("NUM_SLOTS", len(slot_dtypes)), ("SHARED_TARGET", shared_target), ("BLOCK", block), ("ACC", acc))
    return Specialization("pair_errors_kernel", pointers, constexprs)


@functools.lru_cache(maxsize=1024)
def head_specialization(num_models: int, batch: int, modes, has_c2: bool, acc) -> Specialization:
    """The head kernel for ``num_models`` = K + 2 predictions, ``batch`` pairs and the option codes
    ``modes`` (a tuple indexed by ``fastpref.loss.options.ModeSlot``)."""
    pointers = tuple(
        (name, acc)
        for name in (
            "partial_ptr",
            "params_ptr",
            "soft_label_ptr",
            "loss_ptr",
            "coef_ptr",
            "pair_stats_ptr",
            "sample_err_ptr",
            "accuracy_ptr",
        )
    )
    constexprs = (
        ("NUM_MODELS", num_models),
        ("MODELS_PAD", triton.next_power_of_2(num_models)),
        ("BATCH_PAD", triton.next_power_of_2(batch)),
        *((slot.name, int(modes[slot])) for slot in ModeSlot),  # the kernel's constexprs of the options
        ("HAS_C2", has_c2),
        ("ACC", acc),
    )
    return Specialization("pair_head_kernel", pointers, constexprs)


@functools.lru_cache(maxsize=1024)
def grad_specialization(model_dtype, target_dtype, shared_target: bool, block: int, acc, interpreted: bool):
    """The gradient kernel for ``model_pred`` of ``model_dtype`` (the gradient's dtype too)."""
    pointers = (
        ("grad_ptr", model_dtype),
        ("pred_ptr", model_dtype),
        ("target_ptr", target_dtype),
        ("coef_ptr", acc),
        ("grad_loss_ptr", acc),
    )
    constexprs = (("SHARED_TARGET", shared_target), ("BLOCK", block), ("ACC", acc), ("EXACT_BF16", interpreted))
    return Specialization("pair_grad_kernel", pointers, constexprs)


# The inputs over which launchable_specializations enumerates. The option codes, dtypes and block
# sizes are every value a launch can take; K and B, unbounded, are enumerated up to these
# limits: K up to two full launches of the error kernel (every group size, in a first and a
# second launch), B up to 256 pairs (the head kernel's tile grows with next_power_of_2(B)).
CHECKED_MAX_EMA = 2 * K.MAX_SLOTS - 2
CHECKED_MAX_PAIRS = 256


def gpu_block_sizes() -> List[int]:
    """Every ``BLOCK`` that :func:`gpu_block` chooses, for any number of columns."""
    return sorted({gpu_block(1 << i) for i in range(GPU_MAX_BLOCK.bit_length() + 1)})


def launchable_specializations(covering: bool = False) -> List[Specialization]:
    """The specializations a launch on a GPU can compile, through the same functions the
    launchers call, over uniform input dtypes plus mixed ones (a bfloat16 or float16 policy
    with float32 or float64 other inputs), K = 0..``CHECKED_MAX_EMA`` and B =
    1..``CHECKED_MAX_PAIRS``. Per kernel, the product of its own axes (the option codes of the
    head kernel at one K and B, and K x B at the default options): about 1,900 variants.

    ``covering=True``: a deterministic subset of those in which every value of every axis (each
    dtype, block size, group size, K, B, option code) appears at least once, plus each kernel's
    heaviest variant per dtype (largest block, most slots, largest tile): about 50 variants.
    """
    from itertools import product

    from ..options import FLOAT_DTYPES, MODE_OPTIONS, LossType, Margin, Preset, Reduction, Weighting

    blocks = gpu_block_sizes()
    dtype_pairs = [(d, d) for d in FLOAT_DTYPES] + [
        (low, high) for low in (torch.float16, torch.bfloat16) for high in (torch.float32, torch.float64)
    ]  # (policy, every other input)
    acc_of = {pair: acc_dtype(torch.empty(0, dtype=pair[0]), torch.empty(0, dtype=pair[1])) for pair in dtype_pairs}
    group_sizes = sorted({size for k in range(CHECKED_MAX_EMA + 1) for _, size in slot_groups(k + 2)})
    pair_counts = [1 << i for i in range(CHECKED_MAX_PAIRS.bit_length())]
    mode_values = [list(option) for option in MODE_OPTIONS]
    defaults = {
        ModeSlot.PRESET: Preset.OFFICIAL,
        ModeSlot.WEIGHTING: Weighting.LINEAR,
        ModeSlot.MARGIN: Margin.QUADRATIC,
        ModeSlot.LOSS_TYPE: LossType.SIGMOID,
        ModeSlot.REDUCTION: Reduction.MEAN,
    }
    default_modes = tuple(defaults[slot] for slot in ModeSlot)
    heads_at = dict(num_models=4, batch=8)

    def errors(pair, size, shared, block):
        policy, other = pair
        return errors_specialization((policy,) + (other,) * (size - 1), other, shared, block, acc_of[pair])

    def grad(pair, shared, block):
        return grad_specialization(pair[0], pair[1], shared, block, acc_of[pair], interpreted=False)

    specs = []
    if not covering:
        for pair, size, shared, block in product(dtype_pairs, group_sizes, (False, True), blocks):
            specs.append(errors(pair, size, shared, block))
        for pair, shared, block in product(dtype_pairs, (False, True), blocks):
            specs.append(grad(pair, shared, block))
        for acc in (torch.float32, torch.float64):
            for modes in product(*mode_values):
                for has_c2 in (False, True):
                    specs.append(head_specialization(modes=modes, has_c2=has_c2, acc=acc, **heads_at))
            for k, batch in product(range(CHECKED_MAX_EMA + 1), pair_counts):
                specs.append(head_specialization(k + 2, batch, default_modes, False, acc))
    else:
        # Cycle every axis along one index, as long as the longest axis, so each value appears.
        def cycled(axes):
            return [tuple(axis[i % len(axis)] for axis in axes) for i in range(max(map(len, axes)))]

        for pair, size, shared, block in cycled([dtype_pairs, group_sizes, (False, True), blocks]):
            specs.append(errors(pair, size, shared, block))
        for pair, shared, block in cycled([dtype_pairs, (False, True), blocks]):
            specs.append(grad(pair, shared, block))
        for *modes, has_c2, pair in cycled([*mode_values, (False, True), dtype_pairs]):
            specs.append(head_specialization(modes=tuple(modes), has_c2=has_c2, acc=acc_of[pair], **heads_at))
        for k, batch, pair in cycled([list(range(CHECKED_MAX_EMA + 1)), pair_counts, dtype_pairs]):
            specs.append(head_specialization(k + 2, batch, default_modes, False, acc_of[pair]))
        for pair in dtype_pairs[: len(FLOAT_DTYPES)]:  # the heaviest variant of each kernel per dtype
            specs.append(errors(pair, K.MAX_SLOTS, False, blocks[-1]))
            specs.append(grad(pair, False, blocks[-1]))
            specs.append(
                head_specialization(CHECKED_MAX_EMA + 2, CHECKED_MAX_PAIRS, default_modes, False, acc_of[pair])
            )
    return list(dict.fromkeys(specs))  # unique, in order


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[N, *S]`` as a ``[N, D]`` strided view; a copy only where no single column stride
    describes the layout (e.g. channels-last inner dims)."""
    try:
        return tensor.view(tensor.shape[0], -1)
    except RuntimeError:
        return tensor.reshape(tensor.shape[0], -1).contiguous()


@functools.lru_cache(maxsize=64)
def _params(values: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


# Custom ops with the schemas documented on fastpref.loss.autograd.run.


@torch.library.custom_op("fastpref::triton_forward", mutates_args=())
def triton_forward(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    ema_preds: List[torch.Tensor],
    soft_label: Optional[torch.Tensor],
    settings: List[float],
    modes: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The error kernel (one pass over every prediction and the target; ``ceil((K + 2) / 6)``
    passes for K > 4), then the head kernel. Opaque to ``torch.compile`` (a fake gives its
    outputs' shapes)."""
    preds = [model_pred, ref_pred] + list(ema_preds)
    acc = acc_dtype(target, *preds)
    device = model_pred.device
    batch = model_pred.shape[0] // 2
    features = math.prod(model_pred.shape[1:])
    cfg = launch_config(features, batch, device)
    target_rows = _rows(target)
    partial = torch.empty((len(preds), 2 * batch, cfg.n_chunks), dtype=acc, device=device)
    shared = target.shape[0] == batch
    for base, size in slot_groups(len(preds)):
        group = [_rows(p) for p in preds[base : base + size]]
        slot_args = []
        for slot in range(K.MAX_SLOTS):
            rows = group[slot] if slot < len(group) else group[0]
            slot_args += [rows, rows.stride(0), rows.stride(1)]
        spec = errors_specialization(tuple(p.dtype for p in group), target.dtype, shared, cfg.block, acc)
        K.pair_errors_kernel[(batch, cfg.n_chunks)](
            partial,
            base,
            target_rows,
            target_rows.stride(0),
            target_rows.stride(1),
            *slot_args,
            batch,
            features,
            cfg.chunk_size,
            cfg.n_chunks,
            **spec.launch_keywords,
        )

    reduction = modes[ModeSlot.REDUCTION]
    has_c2 = not math.isnan(settings[SettingSlot.C2])
    values = [float(v) for v in settings]
    if not has_c2:
        values[SettingSlot.C2] = 0.0
    params = _params(tuple(values), acc, device)
    loss = torch.empty((batch,) if reduction == Reduction.NONE else (), dtype=acc, device=device)
    coef = torch.empty(batch, dtype=acc, device=device)
    pair_stats = torch.empty((len(autograd.STAT_NAMES), batch), dtype=acc, device=device)
    sample_err = torch.empty((2, 2 * batch), dtype=acc, device=device)
    accuracy = torch.empty((), dtype=acc, device=device)
    soft = soft_label if soft_label is not None else coef  # never read unless loss_type is dedpo
    K.pair_head_kernel[(1,)](
        partial,
        cfg.n_chunks,
        batch,
        features,
        params,
        soft,
        loss,
        coef,
        pair_stats,
        sample_err,
        accuracy,
        **head_specialization(len(preds), batch, tuple(modes), has_c2, acc).launch_keywords,
    )
    return loss, coef, pair_stats, sample_err, accuracy


triton_forward.register_fake(autograd.fake_forward)


@torch.library.custom_op("fastpref::triton_backward", mutates_args=())
def triton_backward(
    grad_loss: torch.Tensor, coef: torch.Tensor, model_pred: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The gradient kernel: ``d loss / d model_pred`` from the saved ``a_j`` (``coef``)."""
    batch = model_pred.shape[0] // 2
    features = math.prod(model_pred.shape[1:])
    cfg = launch_config(features, batch, model_pred.device)
    pred_rows = _rows(model_pred)
    target_rows = _rows(target)
    grad = torch.empty(model_pred.shape, dtype=model_pred.dtype, device=model_pred.device)
    stride_g = grad_loss.stride(0) if grad_loss.dim() == 1 else 0
    K.pair_grad_kernel[(2 * batch, cfg.n_chunks)](
        grad,
        pred_rows,
        pred_rows.stride(0),
        pred_rows.stride(1),
        target_rows,
        target_rows.stride(0),
        target_rows.stride(1),
        coef,
        grad_loss,
        stride_g,
        batch,
        features,
        cfg.chunk_size,
        **grad_specialization(
            model_pred.dtype, target.dtype, target.shape[0] == batch, cfg.block, coef.dtype, interpreter_enabled()
        ).launch_keywords,
    )
    return grad


triton_backward.register_fake(autograd.fake_backward)


OPS = (torch.ops.fastpref.triton_forward.default, torch.ops.fastpref.triton_backward.default)


def run(inputs: LossInputs, config: LossConfig, return_stats: bool):
    """The loss (and stats) of validated inputs on the Triton kernels."""
    return autograd.run(OPS, inputs, config, return_stats)
