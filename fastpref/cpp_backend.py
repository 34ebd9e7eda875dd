"""The ``"cpp"`` backend: fastpref's native CPU kernels (``csrc/``, built as ``fastpref._C``).

Importing ``fastpref._C`` registers the ``torch.library`` ops ``fastpref::cpp_forward`` and
``fastpref::cpp_backward`` (schemas in ``fastpref.fused``); this module adds their fake
implementations, so ``torch.compile`` traces them as opaque ops, and runs them through
``fastpref.fused.FusedAdaptiveDPO`` with the hand-written backward.

The ops take the inputs as they come (``[2B, *S]`` of any float dtype and any strides, a stacked
EMA input as views): the kernels read strided rows directly, including layouts such as
channels-last that no single column stride describes, so nothing is copied on the way in.
``fastpref._C.cpu_isa()`` names the instruction set in use (``FASTPREF_CPU_ISA`` picks another;
all give bitwise-identical results).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library, registering the ops)
from . import fused
from .validation import LossConfig, LossInputs

torch.library.register_fake("fastpref::cpp_forward")(fused.fake_forward)
torch.library.register_fake("fastpref::cpp_backward")(fused.fake_backward)

OPS = (torch.ops.fastpref.cpp_forward.default, torch.ops.fastpref.cpp_backward.default)


def run(inputs: LossInputs, config: LossConfig, return_stats: bool):
    """The loss (and stats) of validated CPU inputs on the native kernels."""
    return fused.run(OPS, inputs, config, return_stats)
