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
from ..options import LossConfig, LossInputs, Reduction, acc_dtype
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


def launch_config(features: int, batch: int, device: torch.device) -> LaunchConfig:
    """Fixed heuristic (no autotuning): on a GPU, split D into chunks so that about four
    programs per SM are in flight; under the interpreter, one big block per row."""
    if device.type != "cuda":
        block = min(triton.next_power_of_2(features), 8192)
        return LaunchConfig(block=block, chunk_size=triton.cdiv(features, block) * block, n_chunks=1)
    # 1024 columns x (K+2) x 2 fp32 accumulators keeps K <= 2 in registers at 4 warps.
    block = min(triton.next_power_of_2(features), 1024)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted_chunks = max(1, min(triton.cdiv(4 * sms, batch), triton.cdiv(features, block)))
    chunk_size = triton.cdiv(triton.cdiv(features, wanted_chunks), block) * block
    return LaunchConfig(block=block, chunk_size=chunk_size, n_chunks=triton.cdiv(features, chunk_size))


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
    for base in range(0, len(preds), K.MAX_SLOTS):
        group = [_rows(p) for p in preds[base : base + K.MAX_SLOTS]]
        slot_args = []
        for slot in range(K.MAX_SLOTS):
            rows = group[slot] if slot < len(group) else group[0]
            slot_args += [rows, rows.stride(0), rows.stride(1)]
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
            NUM_SLOTS=len(group),
            SHARED_TARGET=target.shape[0] == batch,
            BLOCK=cfg.block,
            ACC=_TL_DTYPES[acc],
        )

    preset, weighting, margin, loss_type, reduction = modes
    has_c2 = not math.isnan(settings[4])
    params = _params(tuple(0.0 if (i == 4 and not has_c2) else float(v) for i, v in enumerate(settings)), acc, device)
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
        NUM_MODELS=len(preds),
        MODELS_PAD=triton.next_power_of_2(len(preds)),
        BATCH_PAD=triton.next_power_of_2(batch),
        PRESET=preset,
        WEIGHTING=weighting,
        MARGIN=margin,
        LOSS=loss_type,
        REDUCTION=reduction,
        HAS_C2=has_c2,
        ACC=_TL_DTYPES[acc],
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
        SHARED_TARGET=target.shape[0] == batch,
        BLOCK=cfg.block,
        ACC=_TL_DTYPES[coef.dtype],
        EXACT_BF16=interpreter_enabled(),
    )
    return grad


triton_backward.register_fake(autograd.fake_backward)


OPS = (torch.ops.fastpref.triton_forward.default, torch.ops.fastpref.triton_backward.default)


def run(inputs: LossInputs, config: LossConfig, return_stats: bool):
    """The loss (and stats) of validated inputs on the Triton kernels."""
    return autograd.run(OPS, inputs, config, return_stats)
