"""The autograd glue of the fused backends (Triton, native C++): each backend is a forward and a
backward ``torch.library`` op (contract on :func:`run`), tied together here by
:class:`FusedAdaptiveDPO`, with their fake implementations and the stats of their outputs.
"""

from __future__ import annotations

import torch

from .options import LossConfig, LossInputs, ModeSlot, Reduction, acc_dtype

STAT_NAMES = ("logits", "l_theta", "u", "confidence", "stability", "weight", "margin")

# The error of a double backward through a fused backend (the C++ autograd op raises the same words).
TWICE_MESSAGE = (
    "fastpref: trying to differentiate twice: the gradient of the fused loss is not differentiable "
    "(double backward is not supported; backend='torch' supports it)"
)


def encode(config: LossConfig):
    """``(settings, modes)`` op arguments of a validated config: its ``settings`` and ``modes``
    (made once by ``make_config``, indexed by ``SettingSlot`` and ``ModeSlot``) as lists."""
    return list(config.settings), list(config.modes)


def fake_forward(model_pred, ref_pred, target, ema_preds, soft_label, settings, modes):
    """Output shapes and dtypes of a forward op, for ``register_fake``."""
    acc = acc_dtype(model_pred, ref_pred, target, *ema_preds)
    batch = model_pred.shape[0] // 2
    loss_shape = (batch,) if modes[ModeSlot.REDUCTION] == Reduction.NONE else ()
    new = lambda shape: model_pred.new_empty(shape, dtype=acc)  # noqa: E731
    return new(loss_shape), new((batch,)), new((len(STAT_NAMES), batch)), new((2, 2 * batch)), new(())


def fake_backward(grad_loss, coef, model_pred, target):
    """Output of a backward op, for ``register_fake``: a contiguous tensor like ``model_pred``."""
    return torch.empty_like(model_pred, memory_format=torch.contiguous_format)


class FusedAdaptiveDPO(torch.autograd.Function):
    """Forward: a backend's forward op; backward: its backward op with the saved ``a_j``
    (docs/spec.md §6). Saves only ``a_j`` and the inputs; only ``model_pred`` gets a gradient. The
    gradient is not differentiable: under ``create_graph=True`` it comes back with a node that raises a
    RuntimeError (``TWICE_MESSAGE``) when differentiated (double backward, e.g. a gradient penalty),
    where the backward op alone would silently give no second-order term."""

    @staticmethod
    def forward(ctx, ops, model_pred, ref_pred, target, soft_label, settings, modes, *ema_preds):
        forward_op, backward_op = ops
        loss, coef, pair_stats, sample_err, accuracy = forward_op(
            model_pred, ref_pred, target, list(ema_preds), soft_label, settings, modes
        )
        ctx.backward_op = backward_op
        ctx.set_materialize_grads(False)  # the stats outputs never get a gradient: no zero tensors
        ctx.save_for_backward(coef, model_pred, target)
        ctx.mark_non_differentiable(pair_stats, sample_err, accuracy)
        return loss, pair_stats, sample_err, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _pair_stats, _sample_err, _accuracy):
        coef, model_pred, target = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[1] and grad_loss is not None:
            with torch.no_grad():
                grad = ctx.backward_op(grad_loss, coef, model_pred, target)
            if torch.is_grad_enabled():  # create_graph=True: the gradient raises if differentiated
                grad = not_differentiable(grad, model_pred, grad_loss)
        return (None, grad) + (None,) * (len(ctx.needs_input_grad) - 2)


def not_differentiable(grad: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``grad`` (its values, no copy) as the output of a graph node that raises ``TWICE_MESSAGE``
    when differentiated, with an edge to each of ``inputs`` (those it depends on). Like
    ``@once_differentiable``, but attached whether or not the incoming gradient requires grad (the
    true gradient depends on ``model_pred``, so under ``create_graph=True`` it always requires grad),
    and linked to ``model_pred``: differentiating a function of the gradient (a gradient penalty)
    with respect to ``model_pred`` reaches the node and raises, never silently drops the term."""
    return torch._C._functions.DelayedError(TWICE_MESSAGE, 1 + len(inputs))(grad.detach(), *inputs)[0]


def run(ops, inputs: LossInputs, config: LossConfig, return_stats: bool):
    """The loss (and stats) of validated inputs on a fused backend's ``ops = (forward, backward)``,
    two ``torch.library`` ops with these schemas (``settings`` and ``modes`` as made by
    :func:`encode`):

        forward(model_pred, ref_pred, target, ema_preds: Tensor[], soft_label: Tensor?,
                settings: float[], modes: int[]) -> (loss, coef, pair_stats, sample_err, accuracy)
        backward(grad_loss, coef, model_pred, target) -> grad_model_pred

    Forward outputs, in the accumulation dtype: loss ``[]`` (``[B]`` for reduction "none"), coef
    ``a_j = dLoss/dl_theta[j]`` ``[B]``, pair_stats ``[7, B]`` in the order of ``STAT_NAMES``,
    sample_err ``[2, 2B]`` (policy, reference), accuracy ``[]``.
    """
    settings, modes = encode(config)
    loss, pair_stats, sample_err, accuracy = FusedAdaptiveDPO.apply(
        ops, inputs.model_pred, inputs.ref_pred, inputs.target, inputs.soft_label, settings, modes, *inputs.ema_preds
    )
    return loss, (stats_dict(pair_stats, sample_err, accuracy) if return_stats else None)


def stats_dict(pair_stats, sample_err, accuracy) -> dict:
    """The ``stats`` of docs/spec.md §8 from a forward op's outputs (``implicit_acc`` still a tensor)."""
    stats = dict(zip(STAT_NAMES, pair_stats.unbind(0)))
    stats["err_policy"], stats["err_ref"] = sample_err.unbind(0)
    stats["implicit_acc"] = accuracy
    return stats
