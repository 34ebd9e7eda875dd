"""Backend selection (docs/spec.md §8): the one place that decides which implementation serves a
call and, when the requested one cannot, raises ``RuntimeError`` saying why."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

import torch

from .options import LossConfig, LossInputs, resolve_backend_name

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up once: it sits on every call's path


def triton_unavailable(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device``, or ``None`` if it can."""
    if not TRITON_INSTALLED:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    from .triton.ops import interpreter_enabled

    if device.type == "cpu" and interpreter_enabled():
        return None
    return (
        f"the Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to run them on CPU, slowly)"
    )


def cpp_unavailable(device: torch.device) -> Optional[str]:
    """Why the native C++ backend cannot run on ``device``, or ``None`` if it can."""
    reason = _cpp_load_error()
    if reason is not None:
        return reason
    if device.type != "cpu":
        return f"the native kernels run on CPU tensors only (got {device.type})"
    return None


_CPP_STATUS: list = []  # [reason or None], filled by the first _cpp_load_error call: at import


def _cpp_load_error() -> Optional[str]:
    """Why ``fastpref._C`` (and the ``"cpp"`` backend on it) cannot be loaded, or ``None``;
    looked up once per process, when this module is imported."""
    if not _CPP_STATUS:
        reason = None
        if importlib.util.find_spec("fastpref._C") is None:
            reason = (
                "the native extension fastpref._C is not built (reinstall with a C++ compiler: "
                "pip install --no-build-isolation -e .; FASTPREF_NO_EXT=1 skips it)"
            )
        else:
            try:
                importlib.import_module("fastpref.loss.native")
            except Exception as exc:  # an ImportError, or a registration error raised while loading
                reason = (
                    f"the native extension fastpref._C is built but fails to load: {type(exc).__name__}: {exc} "
                    "(a build older than fastpref's Python code? rebuild: pip install --no-build-isolation -e .)"
                )
        _CPP_STATUS.append(reason)
    return _CPP_STATUS[0]


# Looked up now (loading the library and registering the fakes takes milliseconds), so that a
# call traced by torch.compile only reads _CPP_STATUS and never traces the import. (Marking the
# function with torch.compiler.assume_constant_result would do too, but that imports
# torch._dynamo, which more than doubles the time of `import fastpref`.)
_cpp_load_error()


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot serve tensors on ``device``; ``None`` when it can."""
    if name == "triton":
        return triton_unavailable(device)
    if name == "cpp":
        return cpp_unavailable(device)
    return None  # "torch" runs everywhere


def availability(device) -> dict:
    """``{backend: None or reason}`` for every concrete backend on ``device``."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in ("triton", "cpp", "torch")}


def auto_backend(device: torch.device) -> str:
    """The backend ``"auto"`` picks on ``device``: on CUDA the Triton kernels; on CPU the native
    kernel when it is built, else the eager reference. Every fallback is a backend held to the
    same parity bounds, so falling back never changes results beyond them."""
    for name in ("triton", "torch") if device.type == "cuda" else ("cpp", "torch"):
        if unavailable_reason(name, device) is None:
            return name
    return "torch"  # not reached: "torch" runs everywhere


def select(backend: str, inputs: LossInputs) -> str:
    """The concrete backend serving a call; ``RuntimeError`` if the requested one cannot."""
    name = resolve_backend_name(backend)
    device = inputs.model_pred.device
    if name == "auto":
        return auto_backend(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"fastpref backend {name!r} cannot serve this call: {reason}")
    return name


def run(inputs: LossInputs, config: LossConfig, return_stats: bool, backend: str):
    """Run the loss on the selected backend: ``(loss, stats or None)``."""
    name = select(backend, inputs)
    if name == "cpp":
        from . import native

        return native.run(inputs, config, return_stats)
    if name == "triton":
        from .triton import ops as triton_ops

        return triton_ops.run(inputs, config, return_stats)
    from . import reference

    return reference.forward(inputs, config, return_stats)
