"""An independent float64 reading of the loss spec (docs/spec.md §2-§6) in NumPy, written from the
spec text alone (it imports nothing from ``fastpref``), so that the tests compare two readings of
the spec rather than one implementation with itself.
"""

from __future__ import annotations

import numpy as np


def _f64(x):
    """A tensor (torch, any device-less dtype) or array-like as a float64 NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64)


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    ex = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + ex), ex / (1.0 + ex))


def head(l_theta, W, gamma, *, loss_type, beta, eps, tau, soft_label=None):
    """Per-pair loss L_j (§5, §5b) as a function of l_theta with W and Gamma held fixed."""
    y = beta * l_theta - gamma
    if loss_type == "sigmoid":
        return W * softplus(-y)  # -log(sigmoid(y))
    if loss_type == "ipo":
        return W * (l_theta - gamma / beta - 1.0 / (2.0 * tau)) ** 2
    if loss_type == "hinge":
        return W * np.maximum(1.0 - y, 0.0)
    if loss_type == "robust":
        return W * ((1 - eps) * softplus(-y) - eps * softplus(y)) / (1 - 2 * eps)
    if loss_type == "cdpo":
        return W * ((1 - eps) * softplus(-y) + eps * softplus(y))
    if loss_type == "dedpo":
        return W * (softplus(-y) + (1 - soft_label) * y)
    raise ValueError(loss_type)


def head_grad(l_theta, W, gamma, *, loss_type, beta, eps, tau, soft_label=None):
    """dL_j/dl_theta[j] in closed form (d/dl = beta * d/dy for every head but IPO)."""
    y = beta * l_theta - gamma
    if loss_type == "sigmoid":
        return beta * W * -sigmoid(-y)
    if loss_type == "ipo":
        return 2.0 * W * (l_theta - gamma / beta - 1.0 / (2.0 * tau))
    if loss_type == "hinge":
        return beta * W * -(1.0 - y > 0).astype(np.float64)
    if loss_type == "robust":
        return beta * W * (-(1 - eps) * sigmoid(-y) - eps * sigmoid(y)) / (1 - 2 * eps)
    if loss_type == "cdpo":
        return beta * W * (-(1 - eps) * sigmoid(-y) + eps * sigmoid(y))
    if loss_type == "dedpo":
        return beta * W * (sigmoid(y) - soft_label)
    raise ValueError(loss_type)


def soft_label(batch, synthetic_label, human_label, human_mask, propensity):
    """y~ of §5b; each input a float or a [B] array.

    Reading of an ambiguity: ``y~_j = yhat_j + (R_j / pi_j) * (y_j - yhat_j)`` with ``R_j = 0``
    would be ``0 * NaN = NaN`` for a NaN human label, yet §5b explicitly allows NaN labels where
    ``human_mask`` is False; the term is taken as absent (exactly 0) on unmasked pairs.
    """
    yhat, y, pi = (np.broadcast_to(_f64(v), (batch,)) for v in (synthetic_label, human_label, propensity))
    mask = np.broadcast_to(_f64(human_mask), (batch,)) != 0
    correction = np.zeros(batch)
    correction[mask] = (y[mask] - yhat[mask]) / pi[mask]
    return yhat + correction


def oracle(
    model_pred,
    ref_pred,
    target,
    ema_preds=(),
    *,
    beta=1000.0,
    rho=15.0,
    k1=10.0,
    k2=None,
    c2=None,
    preset="official",
    weighting="linear",
    margin="quadratic",
    loss_type="sigmoid",
    eps=0.1,
    ipo_tau=None,
    reduction="mean",
    synthetic_label=None,
    human_label=None,
    human_mask=None,
    propensity=None,
    grad_output=None,
):
    """``(loss, grad of model_pred, stats)`` of docs/spec.md §2-§6 in float64.

    ``grad_output`` is the upstream gradient (a [B] array for ``reduction="none"``, default ones;
    a scalar otherwise, default 1). ``stats`` has the keys of docs/spec.md §8.
    """
    mp = _f64(model_pred)
    shape = mp.shape
    rows = shape[0]
    B = rows // 2
    mp = mp.reshape(rows, -1)
    D = mp.shape[1]
    rp = _f64(ref_pred).reshape(rows, D)
    tg = _f64(target)
    tg = tg.reshape(tg.shape[0], D)
    if tg.shape[0] == B:  # shared by both halves
        tg = np.concatenate([tg, tg])
    emas = [_f64(e).reshape(rows, D) for e in ema_preds]  # a stacked [K, 2B, *S] iterates over K

    def err(pred):  # §2 e_m
        return ((pred - tg) ** 2).sum(axis=1) / D

    e_theta, e_ref = err(mp), err(rp)

    def pair_l(e):  # §2 l_m
        return (e_ref[:B] - e[:B]) - (e_ref[B:] - e[B:])

    l_theta = pair_l(e_theta)
    z = beta * l_theta
    L = np.stack([l_theta] + [pair_l(err(e)) for e in emas])  # [M, B]
    M = L.shape[0]

    # §3
    if preset == "official":
        norms = np.maximum(np.sqrt((L**2).sum(axis=1, keepdims=True)), 1e-12)
        Z = rho * L / norms
        c = 1.0 - sigmoid(Z).mean(axis=0)
        s = np.minimum(Z.std(axis=0, ddof=1), 1.0) if M > 1 else np.ones(B)
    elif preset == "paper":
        c = 1.0 - sigmoid(rho * L).mean(axis=0)
        s = L.var(axis=0, ddof=1) if M > 1 else np.ones(B)
    else:
        raise ValueError(preset)
    u = c * s

    # §4
    W = {
        "linear": lambda: 1.0 / (1.0 + k1 * u),
        "square": lambda: 1.0 / (1.0 + k1 * u**2),
        "sqrt": lambda: 1.0 / (1.0 + k1 * np.sqrt(u)),
        "sigmoid": lambda: 1.0 / (1.0 + np.exp(k1 * u)),
        "none": lambda: np.ones(B),
    }[weighting]()
    k2 = -1.0 / beta if k2 is None else float(k2)
    c2 = l_theta.mean() if c2 is None else float(c2)
    gamma = {"quadratic": lambda: k2 * u**2 + c2, "linear": lambda: k2 * u + c2, "none": lambda: np.zeros(B)}[margin]()

    # §5, §5b
    options = dict(loss_type=loss_type, beta=beta, eps=eps, tau=beta if ipo_tau is None else float(ipo_tau))
    if loss_type == "dedpo":
        options["soft_label"] = soft_label(B, synthetic_label, human_label, human_mask, propensity)
    per_pair = head(l_theta, W, gamma, **options)
    dper_pair = head_grad(l_theta, W, gamma, **options)
    if reduction == "none":
        loss = per_pair
        upstream = np.ones(B) if grad_output is None else _f64(grad_output)
    else:
        loss = per_pair.mean() if reduction == "mean" else per_pair.sum()
        upstream = (1.0 if grad_output is None else float(grad_output)) * (1.0 / B if reduction == "mean" else 1.0)
    a = upstream * dper_pair  # a_j = dLoss/dl_theta[j]

    # §6
    grad = np.empty_like(mp)
    grad[:B] = -a[:, None] * (2.0 / D) * (mp[:B] - tg[:B])
    grad[B:] = a[:, None] * (2.0 / D) * (mp[B:] - tg[B:])
    grad = grad.reshape(shape)

    stats = dict(
        logits=z,
        l_theta=l_theta,
        u=u,
        confidence=c,
        stability=s,
        weight=W,
        margin=gamma,
        err_policy=e_theta,
        err_ref=e_ref,
        implicit_acc=float(np.mean(z > 0) + 0.5 * np.mean(z == 0)),
    )
    return loss, grad, stats
