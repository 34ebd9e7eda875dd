"""The ``"native"`` backend (formerly ``"cpp"``): fastpref's C++ kernels for CPU and, when built
with CUDA, for CUDA (``csrc/``, built as ``fastpref._C``), called through the op
``fastpref::native_loss``; this module registers the ops' fake implementations.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library, registering the ops)
from . import autograd
from .options import LossConfig, LossInputs

torch.library.register_fake("fastpref::native_forward")(autograd.fake_forward)
torch.library.register_fake("fastpref::native_backward")(autograd.fake_backward)


@torch.library.register_fake("fastpref::native_loss")
def _fake_loss(model_pred, ref_pred, target, ema_preds, soft_label, settings, modes):
    loss, _coef, pair_stats, sample_err, accuracy = autograd.fake_forward(
        model_pred, ref_pred, target, ema_preds, soft_label, settings, modes
    )
    return loss, pair_stats, sample_err, accuracy


# The forward and backward ops (schemas on fastpref.loss.autograd.run), and the two tied together
# by a C++ autograd kernel: the forward op's arguments; outputs (loss, pair_stats, sample_err,
# accuracy).
OPS = (torch.ops.fastpref.native_forward.default, torch.ops.fastpref.native_backward.default)
LOSS_OP = torch.ops.fastpref.native_loss.default


def run(inputs: LossInputs, config: LossConfig, return_stats: bool):
    """The loss (and stats) of validated CPU or CUDA inputs on the native kernels.

    Runs ``fastpref::native_loss`` (csrc/library.cpp): in eager mode neither the forward nor the
    autograd engine's backward enters Python, and under ``torch.compile`` AOTAutograd traces its
    autograd kernel into ``native_forward`` (forward graph) and ``native_backward`` (backward graph),
    opaque ops with fakes. The results are bitwise those of ``fastpref.loss.autograd.run(OPS, ...)``,
    the Python ``autograd.Function`` over the same two ops that the Triton backend uses. The ops
    read the inputs in place, whatever their float dtypes and strides (csrc/README.md).
    """
    settings, modes = autograd.encode(config)
    loss, pair_stats, sample_err, accuracy = LOSS_OP(
        inputs.model_pred, inputs.ref_pred, inputs.target, inputs.ema_preds, inputs.soft_label, settings, modes
    )
    return loss, (autograd.stats_dict(pair_stats, sample_err, accuracy) if return_stats else None)
