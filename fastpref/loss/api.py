"""The public entry points of docs/spec.md §8: ``adaptive_dpo_loss``, ``diffusion_dpo_loss`` and the
module ``AdaptiveDPOLoss``. Each call checks its arguments (``fastpref.loss.options``), then
``fastpref.loss.dispatch`` runs it on a backend. ``fastpref.reference`` wraps these with the
backend pinned to ``"torch"``.
"""

from __future__ import annotations

import inspect

import torch

from . import dispatch
from .options import CONFIG_KEYS, check_backend, make_config, make_inputs


def adaptive_dpo_loss(
    model_pred,
    ref_pred,
    target,
    *,
    ema_preds=(),
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
    return_stats=False,
    backend="auto",
    synthetic_label=None,
    human_label=None,
    human_mask=None,
    propensity=None,
):
    """Adaptive-DPO loss (Diffusion-DPO with a minority-aware weight and margin), docs/spec.md §2-§6.

    Args:
        model_pred: ``[2B, *S]`` policy prediction (float16/bfloat16/float32/float64). Rows
            ``0..B-1`` are the preferred samples, rows ``B..2B-1`` the rejected ones; pair ``j``
            is rows ``j`` and ``j + B``. The only input that receives a gradient.
        ref_pred: ``[2B, *S]`` frozen reference prediction.
        target: ``[2B, *S]``, or ``[B, *S]`` shared by both halves (same noise for w and l):
            the noise for epsilon-prediction, v for v-prediction.
        ema_preds: K ``[2B, *S]`` predictions of the policy's EMA footprints, as a list/tuple or
            one stacked ``[K, 2B, *S]`` tensor; ``()`` for K = 0.
        beta: DPO temperature, > 0. Scale convention: ``z = beta * l_theta`` with l the
            difference of per-sample *mean* squared errors; Salesforce's Diffusion-DPO writes
            ``-0.5 * beta_dpo * (...)``, so its ``beta_dpo = 5000`` equals ``beta = 2500`` here.
            The paper uses 1000 for SD1.5 and 2500 for SDXL.
        rho: scale of l inside the metric u, > 0 (paper: 15).
        k1: weight strength, >= 0 (paper: 10 for SD1.5, 1 for SDXL).
        k2: margin slope; ``None`` means ``-1 / beta``.
        c2: margin offset; ``None`` means the detached batch mean of ``l_theta``.
        preset: ``"official"`` (the authors' code: per-model L2-normalized l, std capped at 1)
            or ``"paper"`` (Eqs. 11-13 as printed: raw l, variance).
        weighting: W = ``"linear"`` 1/(1+k1 u), ``"square"`` 1/(1+k1 u^2), ``"sqrt"``
            1/(1+k1 sqrt u), ``"sigmoid"`` 1/(1+exp(k1 u)) or ``"none"`` 1.
        margin: Gamma = ``"quadratic"`` k2 u^2 + c2, ``"linear"`` k2 u + c2 or ``"none"`` 0.
        loss_type: ``"sigmoid"`` (DPO), ``"ipo"``, ``"hinge"``, ``"robust"`` (rDPO),
            ``"cdpo"`` (label smoothing) or ``"dedpo"`` (debiased soft labels, docs/spec.md §5b).
        eps: label-noise rate of ``"robust"`` / smoothing of ``"cdpo"``, in ``[0, 0.5)``.
        ipo_tau: tau of ``"ipo"``, > 0; ``None`` means ``beta``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-pair ``[B]``).
        return_stats: also return a dict of detached diagnostics (see below).
        backend: ``"auto"``, ``"native"`` (the C++/CUDA kernels of ``fastpref._C``), ``"triton"``
            or ``"torch"`` (eager PyTorch); ``$FASTPREF_BACKEND`` overrides ``"auto"``, which picks
            ``"native"`` when it can serve the inputs' device, else ``"triton"`` on CUDA, else
            ``"torch"``. ``"cpp"`` is a deprecated alias of ``"native"`` (a FutureWarning; removed
            in the next release). A backend that cannot serve the call raises ``RuntimeError``
            with the reason.
        synthetic_label, human_label, human_mask, propensity: ``loss_type="dedpo"`` only; each a
            float or a ``[B]`` tensor (docs/spec.md §5b).

    Returns:
        The loss, float32 (float64 when any input is float64): a scalar, or ``[B]`` with
        ``reduction="none"``. With ``return_stats=True``, ``(loss, stats)`` where ``stats``
        holds detached tensors in the same dtype: ``logits`` (z), ``l_theta``, ``u``,
        ``confidence`` (c), ``stability`` (s), ``weight`` (W), ``margin`` (Gamma), each ``[B]``;
        ``err_policy`` and ``err_ref``, ``[2B]``; and the float ``implicit_acc`` (a 0-dim tensor
        while ``torch.compile`` traces, since a float would force a device sync there).

    Raises:
        ValueError / TypeError naming the argument for malformed calls (docs/spec.md §7).
    """
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool; got {type(return_stats).__name__}")
    # In CONFIG_KEYS order.
    config = cached_config((beta, rho, k1, k2, c2, preset, weighting, margin, loss_type, eps, ipo_tau, reduction))
    labels = dict(
        synthetic_label=synthetic_label, human_label=human_label, human_mask=human_mask, propensity=propensity
    )
    inputs = make_inputs(model_pred, ref_pred, target, ema_preds, config, labels)
    loss, stats = dispatch.run(inputs, config, return_stats, backend)
    return (loss, finish_stats(stats)) if return_stats else loss


def diffusion_dpo_loss(
    model_pred,
    ref_pred,
    target,
    *,
    beta=1000.0,
    loss_type="sigmoid",
    eps=0.1,
    ipo_tau=None,
    reduction="mean",
    return_stats=False,
    backend="auto",
):
    """Diffusion-DPO loss (Wallace et al., 2024): ``adaptive_dpo_loss`` with no EMA models,
    ``weighting="none"`` and ``margin="none"`` (docs/spec.md §5). Shapes, dtypes, ``beta``'s scale
    convention (Salesforce ``beta_dpo = 5000`` is ``beta = 2500`` here), the loss types other than
    ``"dedpo"``, ``reduction``, ``return_stats`` and ``backend`` are as in ``adaptive_dpo_loss``."""
    return adaptive_dpo_loss(
        model_pred,
        ref_pred,
        target,
        beta=beta,
        weighting="none",
        margin="none",
        loss_type=loss_type,
        eps=eps,
        ipo_tau=ipo_tau,
        reduction=reduction,
        return_stats=return_stats,
        backend=backend,
    )


class AdaptiveDPOLoss(torch.nn.Module):
    """``torch.nn.Module`` holding the keywords of ``adaptive_dpo_loss`` (checked once, here).

    ``forward(model_pred, ref_pred, target, ema_preds=(), **overrides)`` calls
    ``adaptive_dpo_loss``; keyword ``overrides`` (e.g. the per-batch DeDPO labels) replace
    the stored keywords for that call.
    """

    # The function forward() calls; its signature gives the default backend.
    _loss_fn = staticmethod(adaptive_dpo_loss)

    def __init__(self, **keywords):
        super().__init__()
        keywords.setdefault("backend", inspect.signature(self._loss_fn).parameters["backend"].default)
        # Fail at construction on a bad keyword, not at the first batch.
        unknown = set(keywords) - set(adaptive_dpo_loss.__kwdefaults__)
        if unknown:
            raise TypeError(f"AdaptiveDPOLoss got unknown keyword(s): {sorted(unknown)}")
        if "ema_preds" in keywords:
            raise TypeError("ema_preds is a forward() argument of AdaptiveDPOLoss, not a keyword")
        make_config(**scalar_keywords(adaptive_dpo_loss, **keywords))
        keywords["backend"] = check_backend("backend", keywords["backend"])  # a deprecated alias warns here, once
        # The DeDPO labels are per-batch data: they are checked against the batch at forward.
        self.keywords = keywords

    def forward(self, model_pred, ref_pred, target, ema_preds=(), **overrides):
        return self._loss_fn(model_pred, ref_pred, target, ema_preds=ema_preds, **{**self.keywords, **overrides})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in sorted(self.keywords.items()) if not isinstance(v, torch.Tensor))


_CONFIG_CACHE: dict = {}


def _make_config(values: tuple):
    """``make_config`` of a tuple of the scalar keywords in ``CONFIG_KEYS`` order."""
    return make_config(**dict(zip(CONFIG_KEYS, values)))


def cached_config(values: tuple):
    """``make_config`` of the scalar keywords ``values`` (a tuple in ``CONFIG_KEYS`` order),
    memoized on their types and values: the checks are pure and sit on every call's path. The
    types are part of the key because ``True == 1 == 1.0`` while ``beta=True`` must raise.
    Unhashable values, and calls while ``torch.compile`` traces, skip the cache (``make_config``
    then raises the proper error for a bad value)."""
    if torch.compiler.is_compiling():
        return _make_config(values)
    try:
        key = values + tuple(map(type, values))
        return _CONFIG_CACHE[key]
    except TypeError:
        return _make_config(values)
    except KeyError:
        config = _make_config(values)
        if len(_CONFIG_CACHE) >= 256:
            _CONFIG_CACHE.clear()
        _CONFIG_CACHE[key] = config
        return config


def scalar_keywords(loss_fn, **given) -> dict:
    """The scalar keywords of ``make_config`` (``CONFIG_KEYS``) for ``loss_fn`` (``adaptive_dpo_loss``
    here or in ``fastpref.reference``): those in ``given``, the rest from ``loss_fn``'s signature,
    the one place their defaults are written."""
    parameters = inspect.signature(loss_fn).parameters
    return {key: given[key] if key in given else parameters[key].default for key in CONFIG_KEYS}


def finish_stats(stats):
    """Turn ``implicit_acc`` into the float of docs/spec.md §8 (kept a tensor while compiling)."""
    if stats is not None and not torch.compiler.is_compiling():
        stats["implicit_acc"] = float(stats["implicit_acc"])
    return stats
