"""Triton kernels of the fused loss: one pass for the per-sample errors, one program for the
per-pair head (its steps in ``fastpref.loss.triton.pair_head``), one pass for the gradient
(launched by ``fastpref.loss.triton.ops``). Every sum runs in a fixed order with no atomics, so
results are bitwise reproducible; each kernel's or step's docstring gives its math (notation of
docs/spec.md §2).
"""

import triton
import triton.language as tl

from ..options import SettingSlot
from .pair_head import (
    LOSS_DEDPO,
    REDUCTION_NONE,
    batch_mean,
    batch_sum,
    implicit_accuracy,
    minority_metric,
    model_row,
    pair_logit,
    pair_loss,
    pair_margin,
    pair_weight,
    reduced_coef,
    reduced_loss,
    sample_error,
    store_pair_stats,
    store_row,
)

MAX_SLOTS = 6  # predictions summed per pass of the error kernel: policy, ref and 4 EMA models

# The scalar settings reach the head kernel as a ``params`` tensor indexed by SettingSlot (the
# string options as constexpr codes, fastpref.loss.triton.pair_head). A kernel reads a global
# only as a constexpr: the slots of fastpref.loss.options, by name.
SETTING_BETA = tl.constexpr(SettingSlot.BETA.value)
SETTING_RHO = tl.constexpr(SettingSlot.RHO.value)
SETTING_K1 = tl.constexpr(SettingSlot.K1.value)
SETTING_K2 = tl.constexpr(SettingSlot.K2.value)
SETTING_C2 = tl.constexpr(SettingSlot.C2.value)
SETTING_EPS = tl.constexpr(SettingSlot.EPS.value)
SETTING_TAU = tl.constexpr(SettingSlot.TAU.value)


@triton.jit
def _squared_error(pred_ptr, row, stride_row, stride_col, cols, mask, target):
    pred = tl.load(pred_ptr + row * stride_row + cols * stride_col, mask=mask, other=0.0)
    diff = pred.to(target.dtype) - target
    return diff * diff


# Over 80 lines: Triton has no arrays of pointers, so the six slots are spelled out one by one.
@triton.jit
def pair_errors_kernel(
    partial_ptr,  # [n_models, 2B, n_chunks] partial sums of squared errors, ACC
    slot_base,  # first model index this launch writes
    target_ptr,
    stride_t_row,
    stride_t_col,
    p0,
    s0r,
    s0c,
    p1,
    s1r,
    s1c,
    p2,
    s2r,
    s2c,
    p3,
    s3r,
    s3c,
    p4,
    s4r,
    s4c,
    p5,
    s5r,
    s5c,
    batch,
    features,
    chunk_size,
    n_chunks,
    NUM_SLOTS: tl.constexpr,
    SHARED_TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program (pair j, chunk c): sum over the chunk's columns of (pred - t)^2 for rows j and
    j+B of every slot. The target chunk is loaded once per row (once per pair if shared).

    Pair j is rows j (winner, w) and j+B (loser, l) of ``[2B, D]`` inputs; the head divides the
    chunk sums' total by D: ``e_m[i] = (1/D) sum_d (pred_m[i,d] - t[i,d])^2`` for model m in
    (policy, ref, ema_1..ema_K).
    """
    pair = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_w = pair
    row_l = pair + batch
    t_row_l = pair if SHARED_TARGET else row_l
    acc_w0 = tl.zeros([BLOCK], ACC)
    acc_l0 = tl.zeros([BLOCK], ACC)
    acc_w1 = tl.zeros([BLOCK], ACC)
    acc_l1 = tl.zeros([BLOCK], ACC)
    acc_w2 = tl.zeros([BLOCK], ACC)
    acc_l2 = tl.zeros([BLOCK], ACC)
    acc_w3 = tl.zeros([BLOCK], ACC)
    acc_l3 = tl.zeros([BLOCK], ACC)
    acc_w4 = tl.zeros([BLOCK], ACC)
    acc_l4 = tl.zeros([BLOCK], ACC)
    acc_w5 = tl.zeros([BLOCK], ACC)
    acc_l5 = tl.zeros([BLOCK], ACC)
    begin = chunk * chunk_size
    for start in range(0, chunk_size, BLOCK):
        cols = begin + start + tl.arange(0, BLOCK)
        mask = cols < features
        t_w = tl.load(target_ptr + row_w * stride_t_row + cols * stride_t_col, mask=mask, other=0.0).to(ACC)
        if SHARED_TARGET:
            t_l = t_w
        else:
            t_l = tl.load(target_ptr + t_row_l * stride_t_row + cols * stride_t_col, mask=mask, other=0.0).to(ACC)
        acc_w0 += _squared_error(p0, row_w, s0r, s0c, cols, mask, t_w)
        acc_l0 += _squared_error(p0, row_l, s0r, s0c, cols, mask, t_l)
        if NUM_SLOTS > 1:
            acc_w1 += _squared_error(p1, row_w, s1r, s1c, cols, mask, t_w)
            acc_l1 += _squared_error(p1, row_l, s1r, s1c, cols, mask, t_l)
        if NUM_SLOTS > 2:
            acc_w2 += _squared_error(p2, row_w, s2r, s2c, cols, mask, t_w)
            acc_l2 += _squared_error(p2, row_l, s2r, s2c, cols, mask, t_l)
        if NUM_SLOTS > 3:
            acc_w3 += _squared_error(p3, row_w, s3r, s3c, cols, mask, t_w)
            acc_l3 += _squared_error(p3, row_l, s3r, s3c, cols, mask, t_l)
        if NUM_SLOTS > 4:
            acc_w4 += _squared_error(p4, row_w, s4r, s4c, cols, mask, t_w)
            acc_l4 += _squared_error(p4, row_l, s4r, s4c, cols, mask, t_l)
        if NUM_SLOTS > 5:
            acc_w5 += _squared_error(p5, row_w, s5r, s5c, cols, mask, t_w)
            acc_l5 += _squared_error(p5, row_l, s5r, s5c, cols, mask, t_l)
    # partial[m, row, chunk]: model stride 2B * n_chunks, row stride n_chunks.
    model_stride = 2 * batch * n_chunks
    out_w = partial_ptr + slot_base * model_stride + row_w * n_chunks + chunk
    out_l = partial_ptr + slot_base * model_stride + row_l * n_chunks + chunk
    tl.store(out_w, tl.sum(acc_w0, axis=0))
    tl.store(out_l, tl.sum(acc_l0, axis=0))
    if NUM_SLOTS > 1:
        tl.store(out_w + model_stride, tl.sum(acc_w1, axis=0))
        tl.store(out_l + model_stride, tl.sum(acc_l1, axis=0))
    if NUM_SLOTS > 2:
        tl.store(out_w + 2 * model_stride, tl.sum(acc_w2, axis=0))
        tl.store(out_l + 2 * model_stride, tl.sum(acc_l2, axis=0))
    if NUM_SLOTS > 3:
        tl.store(out_w + 3 * model_stride, tl.sum(acc_w3, axis=0))
        tl.store(out_l + 3 * model_stride, tl.sum(acc_l3, axis=0))
    if NUM_SLOTS > 4:
        tl.store(out_w + 4 * model_stride, tl.sum(acc_w4, axis=0))
        tl.store(out_l + 4 * model_stride, tl.sum(acc_l4, axis=0))
    if NUM_SLOTS > 5:
        tl.store(out_w + 5 * model_stride, tl.sum(acc_w5, axis=0))
        tl.store(out_l + 5 * model_stride, tl.sum(acc_l5, axis=0))


@triton.jit
def pair_head_kernel(
    partial_ptr,
    n_chunks,
    batch,
    features,
    params_ptr,  # the settings in ACC, indexed by SettingSlot (c2 = 0 unless HAS_C2)
    soft_label_ptr,  # [B] DeDPO label y~ (read only when LOSS_TYPE == LOSS_DEDPO)
    loss_ptr,  # [] or [B] (reduction "none")
    coef_ptr,  # [B] a_j = dLoss/dl_theta[j] for an incoming gradient of 1
    pair_stats_ptr,  # [7, B]: z, l_theta, u, c, s, W, Gamma
    sample_err_ptr,  # [2, 2B]: e_policy, e_ref
    accuracy_ptr,  # []: implicit accuracy
    NUM_MODELS: tl.constexpr,
    MODELS_PAD: tl.constexpr,
    BATCH_PAD: tl.constexpr,
    PRESET: tl.constexpr,
    WEIGHTING: tl.constexpr,
    MARGIN: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    REDUCTION: tl.constexpr,
    HAS_C2: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program, the whole batch: errors -> l -> metric u -> W, Gamma -> loss and a_j ->
    reduction (docs/spec.md §2-§5), one step each above; ``z = beta * l_theta``."""
    beta = tl.load(params_ptr + SETTING_BETA)
    rho = tl.load(params_ptr + SETTING_RHO)
    k1 = tl.load(params_ptr + SETTING_K1)
    k2 = tl.load(params_ptr + SETTING_K2)
    c2_given = tl.load(params_ptr + SETTING_C2)
    eps = tl.load(params_ptr + SETTING_EPS)
    tau = tl.load(params_ptr + SETTING_TAU)

    model = tl.arange(0, MODELS_PAD)[:, None]
    pair = tl.arange(0, BATCH_PAD)
    in_batch = pair < batch
    tile_mask = (model < NUM_MODELS) & (pair[None, :] < batch)

    offs_w = model * (2 * batch * n_chunks) + pair[None, :] * n_chunks
    offs_l = offs_w + batch * n_chunks
    err_w, err_l = sample_error(partial_ptr, offs_w, offs_l, tile_mask, n_chunks, features, MODELS_PAD, BATCH_PAD, ACC)
    ref_w = model_row(err_w, model, 1)
    ref_l = model_row(err_l, model, 1)
    logit = pair_logit(ref_w[None, :], ref_l[None, :], err_w, err_l)  # every model row; the ref's is 0
    l_theta = model_row(logit, model, 0)

    metric_rows = (model != 1) & tile_mask
    u, confidence, stability = minority_metric(logit, metric_rows, rho, PRESET, NUM_MODELS - 1, BATCH_PAD, ACC)
    weight = pair_weight(u, k1, WEIGHTING, BATCH_PAD, ACC)
    if HAS_C2:
        c2 = c2_given
    else:
        c2 = batch_mean(l_theta, in_batch, batch)
    margin = pair_margin(u, k2, c2, MARGIN, BATCH_PAD, ACC)
    z = beta * l_theta
    if LOSS_TYPE == LOSS_DEDPO:
        soft_label = tl.load(soft_label_ptr + pair, mask=in_batch, other=0.0)
    else:
        soft_label = tl.zeros([BATCH_PAD], ACC)
    per_pair, coef = pair_loss(l_theta, weight, margin, beta, eps, tau, soft_label, LOSS_TYPE)

    if REDUCTION == REDUCTION_NONE:
        tl.store(loss_ptr + pair, per_pair, mask=in_batch)
    else:
        tl.store(loss_ptr, reduced_loss(batch_sum(per_pair, in_batch), batch, REDUCTION))
    coef = reduced_coef(coef, batch, REDUCTION)
    tl.store(coef_ptr + pair, coef, mask=in_batch)
    store_pair_stats(pair_stats_ptr, batch, pair, in_batch, z, l_theta, u, confidence, stability, weight, margin)
    policy_w = model_row(err_w, model, 0)
    policy_l = model_row(err_l, model, 0)
    store_row(sample_err_ptr, 0, batch, pair, in_batch, policy_w)
    store_row(sample_err_ptr, 1, batch, pair, in_batch, policy_l)
    store_row(sample_err_ptr, 2, batch, pair, in_batch, ref_w)
    store_row(sample_err_ptr, 3, batch, pair, in_batch, ref_l)
    tl.store(accuracy_ptr, implicit_accuracy(z, in_batch, batch))


@triton.jit
def _to_output(x, out_dtype: tl.constexpr, EXACT_BF16: tl.constexpr):
    # Triton's CPU interpreter truncates float32 -> bfloat16 where GPUs round to nearest even.
    # Under the interpreter (EXACT_BF16) we round explicitly: adding 0x7FFF plus the lowest kept
    # bit to the float32 bits and dropping the low 16 bits is round-to-nearest-even; NaN is kept.
    if EXACT_BF16 and out_dtype == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        rounded = tl.where(x32 != x32, x32, bits.to(tl.float32, bitcast=True))
        return rounded.to(tl.bfloat16)
    return x.to(out_dtype)


@triton.jit
def pair_grad_kernel(
    grad_ptr,  # [2B, D] contiguous, model_pred's dtype
    pred_ptr,
    stride_p_row,
    stride_p_col,
    target_ptr,
    stride_t_row,
    stride_t_col,
    coef_ptr,  # [B] a_j
    grad_loss_ptr,
    stride_g,  # incoming gradient: [] or [B] (stride_g = its stride)
    batch,
    features,
    chunk_size,
    SHARED_TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    """Program (row i, chunk c): the gradient rows of docs/spec.md §6. The loss depends on
    ``model_pred`` only through ``l_theta`` (u, W, Gamma and c2 are stop-gradient), with
    ``l_theta[j] = e_ref[j] - e_theta[j] - e_ref[j+B] + e_theta[j+B]`` and
    ``de_theta[i]/dpred[i,d] = (2/D) (pred[i,d] - t[i,d])``, so with the head's ``a_j``:

        dLoss/dpred[j,   d] = -a_j * (2/D) * (pred[j,   d] - t[j,   d])
        dLoss/dpred[j+B, d] = +a_j * (2/D) * (pred[j+B, d] - t[j+B, d])

    times the incoming per-pair gradient g_j for reduction "none" (a scalar g otherwise).
    """
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    is_loser = row >= batch
    pair = tl.where(is_loser, row - batch, row)
    t_row = pair if SHARED_TARGET else row
    scale = tl.load(coef_ptr + pair).to(ACC) * tl.load(grad_loss_ptr + pair * stride_g).to(ACC)
    scale = tl.where(is_loser, scale, -scale) * 2.0 / features
    begin = chunk * chunk_size
    for start in range(0, chunk_size, BLOCK):
        cols = begin + start + tl.arange(0, BLOCK)
        mask = cols < features
        pred = tl.load(pred_ptr + row * stride_p_row + cols * stride_p_col, mask=mask, other=0.0).to(ACC)
        target = tl.load(target_ptr + t_row * stride_t_row + cols * stride_t_col, mask=mask, other=0.0).to(ACC)
        grad = scale * (pred - target)
        tl.store(grad_ptr + row * features + cols, _to_output(grad, grad_ptr.dtype.element_ty, EXACT_BF16), mask=mask)
