"""Backend selection (docs/spec.md §8): the one place that decides which implementation serves a
call and, when the requested one cannot, raises ``RuntimeError`` saying why."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

import torch

from .options import BACKENDS, LossConfig, LossInputs, resolve_backend_name

CONCRETE_BACKENDS = tuple(name for name in BACKENDS if name != "auto")  # the keys of availability()
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


# The ops the native backend calls (fastpref.loss.native): native_loss, the C++ autograd op, runs
# the kernels of native_forward and native_backward.
NATIVE_KERNEL_OPS = ("fastpref::native_forward", "fastpref::native_backward")
NATIVE_LOSS_OP = "fastpref::native_loss"


def native_cuda_kernels_registered() -> bool:
    """Whether the loaded ``fastpref._C`` holds CUDA kernels for every op the native backend calls:
    ``native_forward`` and ``native_backward`` registered for the CUDA dispatch key, and ``native_loss``
    served there (a CUDA kernel or a composite one; its Autograd kernel alone does not serve
    ``torch.inference_mode``). False when the extension was built without CUDA."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return all(
        has_kernel(op, "CUDA") for op in NATIVE_KERNEL_OPS
    ) and torch._C._dispatch_has_computed_kernel_for_dispatch_key(NATIVE_LOSS_OP, "CUDA")


def native_unavailable(device: torch.device) -> Optional[str]:
    """Why the native backend (``fastpref._C``) cannot run on ``device``, or ``None`` if it can."""
    status = _native_status()
    if status["load_error"] is not None:
        return status["load_error"]
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if status["cuda"]:
            return None
        return (
            "the native extension fastpref._C was built without CUDA kernels (it builds them when the "
            "installed torch has CUDA and nvcc is found, unless FASTPREF_NO_CUDA=1; rebuild on a CUDA machine: "
            "pip install --no-build-isolation -e .); backend='triton' runs on CUDA"
        )
    return f"the native kernels run on CPU and CUDA tensors only (got {device.type})"


# {"load_error": reason or None, "cuda": bool}, filled by the first _native_status call: at import.
_NATIVE_STATUS: dict = {}


def _native_status() -> dict:
    """Why ``fastpref._C`` (the native backend) cannot be loaded (``"load_error"``, or ``None``) and
    whether it holds CUDA kernels (``"cuda"``); looked up once per process, when this module is
    imported."""
    if not _NATIVE_STATUS:
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
        _NATIVE_STATUS.update(load_error=reason, cuda=reason is None and native_cuda_kernels_registered())
    return _NATIVE_STATUS


# Looked up now (loading the library and registering the fakes takes milliseconds), so that a
# call traced by torch.compile only reads _NATIVE_STATUS and never traces the import or the
# dispatcher queries. (Marking the function with torch.compiler.assume_constant_result would do
# too, but that imports torch._dynamo, which more than doubles the time of `import fastpref`.)
_native_status()


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot serve tensors on ``device``; ``None`` when it can."""
    if name == "triton":
        return triton_unavailable(device)
    if name == "native":
        return native_unavailable(device)
    return None  # "torch" runs everywhere


def availability(device) -> dict:
    """``{backend: None or reason}`` for every concrete backend on ``device``."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in CONCRETE_BACKENDS}


def auto_backend(device: torch.device) -> str:
    """The backend ``"auto"`` picks on ``device``: the native kernels when they serve the device
    (CPU; CUDA when ``fastpref._C`` was built with CUDA), else on CUDA the Triton kernels, else the
    eager reference. Every fallback is a backend held to the same parity bounds, so falling back
    never changes results beyond them."""
    for name in ("native", "triton", "torch") if device.type == "cuda" else ("native", "torch"):
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
    if name == "native":
        from . import native

        return native.run(inputs, config, return_stats)
    if name == "triton":
        from .triton import ops as triton_ops

        return triton_ops.run(inputs, config, return_stats)
    from . import reference

    return reference.forward(inputs, config, return_stats)
