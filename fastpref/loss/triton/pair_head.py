"""The per-pair head's steps in Triton, called by ``pair_head_kernel``
(``fastpref.loss.triton.kernels``) and named as in the other two heads,
``fastpref/loss/reference.py`` and ``csrc/common/pair_head.h``, so the three read side by side.
They work on the head kernel's tile ``[MODELS_PAD, BATCH_PAD]`` (model row 0 the policy, 1 the
reference, 2.. the EMAs) or on its ``[BATCH_PAD]`` rows of pairs; each step's docstring gives its
math (notation of docs/spec.md §2-§5).
"""

import triton
import triton.language as tl

from ..options import LossType, Margin, Preset, Reduction, Weighting

# The string options reach the head kernel as their codes (constexpr arguments named after their
# ModeSlot); a step reads a global only as a constexpr: the codes of fastpref.loss.options, by name.
PRESET_OFFICIAL = tl.constexpr(Preset.OFFICIAL.value)
WEIGHTING_LINEAR = tl.constexpr(Weighting.LINEAR.value)
WEIGHTING_SQUARE = tl.constexpr(Weighting.SQUARE.value)
WEIGHTING_SQRT = tl.constexpr(Weighting.SQRT.value)
WEIGHTING_SIGMOID = tl.constexpr(Weighting.SIGMOID.value)
MARGIN_QUADRATIC = tl.constexpr(Margin.QUADRATIC.value)
MARGIN_LINEAR = tl.constexpr(Margin.LINEAR.value)
LOSS_SIGMOID = tl.constexpr(LossType.SIGMOID.value)
LOSS_IPO = tl.constexpr(LossType.IPO.value)
LOSS_HINGE = tl.constexpr(LossType.HINGE.value)
LOSS_ROBUST = tl.constexpr(LossType.ROBUST.value)
LOSS_CDPO = tl.constexpr(LossType.CDPO.value)
LOSS_DEDPO = tl.constexpr(LossType.DEDPO.value)
REDUCTION_MEAN = tl.constexpr(Reduction.MEAN.value)
REDUCTION_NONE = tl.constexpr(Reduction.NONE.value)


@triton.jit
def _sigmoid(x):
    # Stable for any finite x: exp of a non-positive number never overflows.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x (Goldberg's trick); libdevice's log1p is not available to
    # the CPU interpreter.
    u = 1.0 + x
    denom = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * x / denom)


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|); a NaN x stays NaN through the log1p term.
    return tl.where(x > 0, x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sample_error(
    partial_ptr,
    offs_w,
    offs_l,
    tile_mask,
    n_chunks,
    features,
    MODELS_PAD: tl.constexpr,
    BATCH_PAD: tl.constexpr,
    ACC: tl.constexpr,
):
    """§2: ``(e[j], e[j+B])`` of every model row and pair from ``partial`` at ``offs_w`` and
    ``offs_l``: each row's chunk partial sums added in chunk order (bitwise reproducible), over D."""
    sum_w = tl.zeros([MODELS_PAD, BATCH_PAD], ACC)
    sum_l = tl.zeros([MODELS_PAD, BATCH_PAD], ACC)
    for c in range(n_chunks):
        sum_w += tl.load(partial_ptr + offs_w + c, mask=tile_mask, other=0.0)
        sum_l += tl.load(partial_ptr + offs_l + c, mask=tile_mask, other=0.0)
    return sum_w / features, sum_l / features


@triton.jit
def model_row(tile, model, index):
    """Row ``index`` (a model) of a tile, as a ``[BATCH_PAD]`` row."""
    return tl.sum(tl.where(model == index, tile, 0.0), axis=0)


@triton.jit
def pair_logit(ref_w, ref_l, err_w, err_l):
    """§2: ``l = (e_ref[j] - e[j]) - (e_ref[j+B] - e[j+B])``."""
    return (ref_w - err_w) - (ref_l - err_l)


@triton.jit
def logit_norm(logit):
    """§3, official preset: ``max(||l_m||, 1e-12)`` over the batch, per model row, keeping NaN."""
    norm = tl.sqrt(tl.sum(logit * logit, axis=1))
    return tl.where(norm < 1e-12, 1e-12, norm)


@triton.jit
def scaled_logit(logit, rho, PRESET: tl.constexpr):
    """§3: ``rho * l``, divided by ``logit_norm`` under the official preset."""
    if PRESET == PRESET_OFFICIAL:
        norm = logit_norm(logit)
        scaled = rho * logit / norm[:, None]
    else:
        scaled = rho * logit
    return scaled


@triton.jit
def minority_metric(
    logit, metric_rows, rho, PRESET: tl.constexpr, N_ROWS: tl.constexpr, BATCH_PAD: tl.constexpr, ACC: tl.constexpr
):
    """§3: ``(u, confidence c, stability s)`` of each pair from the l of the ``metric_rows`` (the
    M = N_ROWS rows of the policy and the EMAs)."""
    logit = tl.where(metric_rows, logit, 0.0)
    scaled = scaled_logit(logit, rho, PRESET)
    confidence = 1.0 - tl.sum(tl.where(metric_rows, _sigmoid(scaled), 0.0), axis=0) / N_ROWS
    if N_ROWS > 1:
        spread_of = scaled if PRESET == PRESET_OFFICIAL else logit
        mean = tl.sum(spread_of, axis=0) / N_ROWS
        dev = tl.where(metric_rows, spread_of - mean[None, :], 0.0)
        var = tl.sum(dev * dev, axis=0) / (N_ROWS - 1)
        if PRESET == PRESET_OFFICIAL:
            std = tl.sqrt(var)
            stability = tl.where(std > 1.0, 1.0, std)  # min(std, 1) that keeps NaN
        else:
            stability = var
    else:
        stability = tl.full([BATCH_PAD], 1.0, ACC)
    return confidence * stability, confidence, stability


@triton.jit
def pair_weight(u, k1, WEIGHTING: tl.constexpr, BATCH_PAD: tl.constexpr, ACC: tl.constexpr):
    """§4: the weight W."""
    if WEIGHTING == WEIGHTING_LINEAR:
        weight = 1.0 / (1.0 + k1 * u)
    elif WEIGHTING == WEIGHTING_SQUARE:
        weight = 1.0 / (1.0 + k1 * u * u)
    elif WEIGHTING == WEIGHTING_SQRT:
        weight = 1.0 / (1.0 + k1 * tl.sqrt(u))
    elif WEIGHTING == WEIGHTING_SIGMOID:
        weight = 1.0 / (1.0 + tl.exp(k1 * u))
    else:  # none
        weight = tl.full([BATCH_PAD], 1.0, ACC)
    return weight


@triton.jit
def batch_sum(values, in_batch):
    """The sum over the batch's pairs of a ``[BATCH_PAD]`` row."""
    return tl.sum(tl.where(in_batch, values, 0.0), axis=0)


@triton.jit
def batch_mean(values, in_batch, batch):
    """§4: the default margin offset c2 is the batch mean of l_theta."""
    return batch_sum(values, in_batch) / batch


@triton.jit
def pair_margin(u, k2, c2, MARGIN: tl.constexpr, BATCH_PAD: tl.constexpr, ACC: tl.constexpr):
    """§4: the margin Gamma."""
    if MARGIN == MARGIN_QUADRATIC:
        margin = k2 * u * u + c2
    elif MARGIN == MARGIN_LINEAR:
        margin = k2 * u + c2
    else:  # none
        margin = tl.zeros([BATCH_PAD], ACC)
    return margin


@triton.jit
def pair_loss(l_theta, weight, margin, beta, eps, tau, soft_label, LOSS_TYPE: tl.constexpr):
    """§5, §5b: the per-pair loss ``L_j`` and ``a_j = dL_j/dl_theta[j]`` (the gradient kernel's
    input), with ``y = beta * l_theta - Gamma``. ``a_j`` follows from ``dy/dl_theta = beta``,
    ``softplus' = sigmoid`` and ``sigmoid(-y) = 1 - sigmoid(y)``, with u, W, Gamma and c2
    stop-gradient (docs/spec.md §6); ``soft_label`` (y~) is read by "dedpo" only:

        sigmoid  L = W softplus(-y)                          a = -W beta sigmoid(-y)
        ipo      L = W r^2, r = l - Gamma/beta - 1/(2 tau)   a = 2 W r
        hinge    L = W relu(1 - y)                           a = -W beta [1 - y > 0]
        robust   L = W ((1-e) softplus(-y) - e softplus(y)) / (1-2e)
                                                             a = -W beta ((1-e) sigmoid(-y) + e sigmoid(y)) / (1-2e)
        cdpo     L = W ((1-e) softplus(-y) + e softplus(y))  a = W beta (e sigmoid(y) - (1-e) sigmoid(-y))
        dedpo    L = W (softplus(-y) + (1 - y~) y)           a = W beta (sigmoid(y) - y~)
    """
    y = beta * l_theta - margin
    if LOSS_TYPE == LOSS_SIGMOID:  # DPO
        per_pair = weight * _softplus(-y)
        coef = -weight * beta * _sigmoid(-y)
    elif LOSS_TYPE == LOSS_IPO:
        resid = l_theta - margin / beta - 1.0 / (2.0 * tau)
        per_pair = weight * resid * resid
        coef = 2.0 * weight * resid
    elif LOSS_TYPE == LOSS_HINGE:  # relu written so that NaN propagates
        gap = 1.0 - y
        per_pair = weight * tl.where(gap < 0.0, 0.0, gap)
        coef = -weight * beta * tl.where(gap > 0.0, 1.0, 0.0)
    elif LOSS_TYPE == LOSS_ROBUST:
        per_pair = weight * ((1.0 - eps) * _softplus(-y) - eps * _softplus(y)) / (1.0 - 2.0 * eps)
        coef = -weight * beta * ((1.0 - eps) * _sigmoid(-y) + eps * _sigmoid(y)) / (1.0 - 2.0 * eps)
    elif LOSS_TYPE == LOSS_CDPO:
        per_pair = weight * ((1.0 - eps) * _softplus(-y) + eps * _softplus(y))
        coef = weight * beta * (eps * _sigmoid(y) - (1.0 - eps) * _sigmoid(-y))
    else:  # LOSS_DEDPO
        per_pair = weight * (_softplus(-y) + (1.0 - soft_label) * y)
        coef = weight * beta * (_sigmoid(y) - soft_label)
    return per_pair, coef


@triton.jit
def reduced_coef(coef, batch, REDUCTION: tl.constexpr):
    """§5: ``a_j`` of the reduced loss (the mean divides by B) ..."""
    if REDUCTION == REDUCTION_MEAN:
        coef = coef / batch
    return coef


@triton.jit
def reduced_loss(total, batch, REDUCTION: tl.constexpr):
    """... and the loss from the sum of the per-pair losses ("none" keeps them per pair instead)."""
    if REDUCTION == REDUCTION_MEAN:
        total = total / batch
    return total


@triton.jit
def implicit_accuracy(z, in_batch, batch):
    """§8: the share of pairs with z > 0, ties counted half."""
    wins = tl.sum(tl.where(in_batch & (z > 0), 1.0, 0.0), axis=0)
    ties = tl.sum(tl.where(in_batch & (z == 0), 1.0, 0.0), axis=0)
    return (wins + 0.5 * ties) / batch


@triton.jit
def store_row(ptr, row, batch, pair, in_batch, values):
    """Row ``row`` of a ``[rows, B]`` output."""
    tl.store(ptr + row * batch + pair, values, mask=in_batch)


@triton.jit
def store_pair_stats(ptr, batch, pair, in_batch, z, l_theta, u, confidence, stability, weight, margin):
    """The ``[7, B]`` pair stats, rows in the order of ``fastpref.loss.autograd.STAT_NAMES``."""
    store_row(ptr, 0, batch, pair, in_batch, z)
    store_row(ptr, 1, batch, pair, in_batch, l_theta)
    store_row(ptr, 2, batch, pair, in_batch, u)
    store_row(ptr, 3, batch, pair, in_batch, confidence)
    store_row(ptr, 4, batch, pair, in_batch, stability)
    store_row(ptr, 5, batch, pair, in_batch, weight)
    store_row(ptr, 6, batch, pair, in_batch, margin)
