"""Eager PyTorch math of the loss: the ``"torch"`` backend (``fastpref.reference`` runs only this),
the oracle of the fused backends' tests and the baseline of every benchmark.

Each function is one section of docs/spec.md in plain differentiable PyTorch ops, so autograd
supplies the gradient; u, W, Gamma and c2 are detached (docs/spec.md §6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import LossConfig, LossInputs


def sample_error(pred: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """Spec §2: ``e[i] = mean_d (pred[i, d] - target[i, d])^2``; ``[2B]`` in the accumulation dtype.
    A shared ``[B, *S]`` target serves both halves. The target is a constant (docs/spec.md §6)."""
    target = inputs.target.detach()
    if inputs.shared_target:
        target = torch.cat([target, target])
    diff = pred.to(inputs.acc_dtype) - target.to(inputs.acc_dtype)
    return diff.square().flatten(1).mean(dim=1)


def pair_logit(err_model: torch.Tensor, err_ref: torch.Tensor, batch: int) -> torch.Tensor:
    """Spec §2: ``l[j] = (e_ref[j] - e[j]) - (e_ref[j+B] - e[j+B])``; ``[B]``."""
    gain = err_ref - err_model
    return gain[:batch] - gain[batch:]


def minority_metric(logits: torch.Tensor, config: LossConfig):
    """Spec §3: confidence c, stability s and metric u (each ``[B]``) from the detached ``[M, B]``
    stack of l (policy first, then the EMA footprints)."""
    count = logits.shape[0]
    if config.preset == "official":
        norms = torch.linalg.vector_norm(logits, dim=1, keepdim=True)
        scaled = config.rho * logits / norms.clamp_min(1e-12)
        confidence = 1 - torch.sigmoid(scaled).mean(dim=0)
        spread = scaled.std(dim=0).clamp_max(1.0) if count > 1 else None
    else:  # "paper"
        confidence = 1 - torch.sigmoid(config.rho * logits).mean(dim=0)
        spread = logits.var(dim=0) if count > 1 else None
    stability = torch.ones_like(confidence) if spread is None else spread
    return confidence * stability, confidence, stability


def pair_weight(u: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Spec §4: the weight W."""
    if config.weighting == "linear":
        return 1 / (1 + config.k1 * u)
    if config.weighting == "square":
        return 1 / (1 + config.k1 * u.square())
    if config.weighting == "sqrt":
        return 1 / (1 + config.k1 * u.sqrt())
    if config.weighting == "sigmoid":
        return 1 / (1 + torch.exp(config.k1 * u))
    return torch.ones_like(u)


def pair_margin(u: torch.Tensor, l_theta: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Spec §4: the margin Gamma; ``c2`` defaults to the batch mean of the detached ``l_theta``."""
    c2 = l_theta.mean() if config.c2 is None else config.c2
    if config.margin == "quadratic":
        return config.k2 * u.square() + c2
    if config.margin == "linear":
        return config.k2 * u + c2
    return torch.zeros_like(u)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + e^x) = -log(sigmoid(-x)); logsigmoid is stable for every finite x and its gradient
    # is exact at 0 (a clamp/abs formulation is not).
    return -F.logsigmoid(-x)


def pair_loss(l_theta, weight, margin, config: LossConfig, soft_label=None) -> torch.Tensor:
    """Spec §5/§5b: the per-pair loss ``L_j``, ``[B]``, with ``y = beta * l_theta - Gamma``."""
    y = config.beta * l_theta - margin
    if config.loss_type == "sigmoid":
        per_pair = _softplus(-y)
    elif config.loss_type == "ipo":
        per_pair = (l_theta - margin / config.beta - 1 / (2 * config.tau)).square()
    elif config.loss_type == "hinge":
        per_pair = torch.relu(1 - y)
    elif config.loss_type == "robust":
        eps = config.eps
        per_pair = ((1 - eps) * _softplus(-y) - eps * _softplus(y)) / (1 - 2 * eps)
    elif config.loss_type == "cdpo":
        eps = config.eps
        per_pair = (1 - eps) * _softplus(-y) + eps * _softplus(y)
    else:  # "dedpo"
        per_pair = _softplus(-y) + (1 - soft_label) * y
    return weight * per_pair


def forward(inputs: LossInputs, config: LossConfig, return_stats: bool):
    """The whole loss of docs/spec.md §2-§5 on validated inputs. Returns ``(loss, stats)``; ``stats`` is
    ``None`` unless ``return_stats``; ``loss`` is a scalar, or ``[B]`` for ``reduction="none"``."""
    batch = inputs.batch
    err_policy = sample_error(inputs.model_pred, inputs)
    err_ref = sample_error(inputs.ref_pred.detach(), inputs)  # a constant, like the EMAs
    l_theta = pair_logit(err_policy, err_ref, batch)
    with torch.no_grad():
        ema_logits = [pair_logit(sample_error(p, inputs), err_ref, batch) for p in inputs.ema_preds]
        stacked = torch.stack([l_theta.detach()] + ema_logits)
        u, confidence, stability = minority_metric(stacked, config)
        weight = pair_weight(u, config)
        margin = pair_margin(u, l_theta.detach(), config)
    per_pair = pair_loss(l_theta, weight, margin, config, inputs.soft_label)
    if config.reduction == "mean":
        loss = per_pair.mean()
    elif config.reduction == "sum":
        loss = per_pair.sum()
    else:
        loss = per_pair
    if not return_stats:
        return loss, None
    logits = config.beta * l_theta.detach()
    stats = {
        "logits": logits,
        "l_theta": l_theta.detach(),
        "u": u,
        "confidence": confidence,
        "stability": stability,
        "weight": weight,
        "margin": margin,
        "err_policy": err_policy.detach(),
        "err_ref": err_ref.detach(),
        "implicit_acc": (logits > 0).to(logits.dtype).mean() + 0.5 * (logits == 0).to(logits.dtype).mean(),
    }
    return loss, stats
