"""The ``"cpp"`` backend: fastpref's native CPU kernels (``csrc/``, built as ``fastpref._C``).

Importing ``fastpref._C`` registers three ``torch.library`` ops: ``fastpref::cpp_forward`` and
``fastpref::cpp_backward`` (schemas in ``fastpref.loss.autograd``), and ``fastpref::cpp_loss``, the
forward op with the backward op attached by a C++ autograd kernel (``csrc/fastpref_autograd.cpp``):
same arguments as ``cpp_forward``, outputs ``(loss, pair_stats, sample_err, accuracy)``. This
module adds their fake implementations.

Every call runs ``cpp_loss``: in eager mode neither the forward nor the autograd engine's
backward enters Python, and under ``torch.compile`` AOTAutograd traces the autograd kernel into
``cpp_forward`` (forward graph) and ``cpp_backward`` (backward graph), opaque ops with fakes. It
is bitwise identical to running the two ops through ``fastpref.loss.autograd.FusedAdaptiveDPO`` as the
Triton backend does (``tests/test_cpp_backend.py``); setting ``_python_autograd = True`` makes
calls take that path (for those tests and ``benchmarks/bench_overhead.py``).

The ops take the inputs as they come (``[2B, *S]`` of any float dtype and any strides, a stacked
EMA input as views): the kernels read strided rows directly, including layouts such as
channels-last that no single column stride describes, so nothing is copied on the way in.
``fastpref._C.cpu_isa()`` names the instruction set in use (``FASTPREF_CPU_ISA`` picks another;
all give bitwise-identical results).
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library, registering the ops)
from . import autograd as fused
from .options import LossConfig, LossInputs

torch.library.register_fake("fastpref::cpp_forward")(fused.fake_forward)
torch.library.register_fake("fastpref::cpp_backward")(fused.fake_backward)


@torch.library.register_fake("fastpref::cpp_loss")
def _fake_loss(model_pred, ref_pred, target, ema_preds, soft_label, settings, modes):
    loss, _coef, pair_stats, sample_err, accuracy = fused.fake_forward(
        model_pred, ref_pred, target, ema_preds, soft_label, settings, modes
    )
    return loss, pair_stats, sample_err, accuracy


OPS = (torch.ops.fastpref.cpp_forward.default, torch.ops.fastpref.cpp_backward.default)
LOSS_OP = torch.ops.fastpref.cpp_loss.default

_python_autograd = False  # private switch: eager calls through fused.FusedAdaptiveDPO as well


def run(inputs: LossInputs, config: LossConfig, return_stats: bool):
    """The loss (and stats) of validated CPU inputs on the native kernels."""
    if _python_autograd:
        return fused.run(OPS, inputs, config, return_stats)
    settings, modes = fused.encode(config)
    loss, pair_stats, sample_err, accuracy = LOSS_OP(
        inputs.model_pred, inputs.ref_pred, inputs.target, inputs.ema_preds, inputs.soft_label, settings, modes
    )
    return loss, (fused.stats_dict(pair_stats, sample_err, accuracy) if return_stats else None)
