"""The eager PyTorch implementation of the public API: ``fastpref``'s three names and signatures with
the backend pinned to ``"torch"`` (the math is in ``fastpref.loss.reference``)."""

from __future__ import annotations

import inspect

from .loss import api


def _check_backend(backend) -> None:
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'torch' (or 'auto') for fastpref.reference; got {backend!r}")


# The two functions take fastpref's docstrings and signatures (with backend="torch"): see _document.
# The backend is checked after the call, so that a malformed argument is named first, as in fastpref.


def adaptive_dpo_loss(model_pred, ref_pred, target, *, backend="torch", **keywords):
    result = api.adaptive_dpo_loss(model_pred, ref_pred, target, backend="torch", **keywords)
    _check_backend(backend)
    return result


def diffusion_dpo_loss(model_pred, ref_pred, target, *, backend="torch", **keywords):
    result = api.diffusion_dpo_loss(model_pred, ref_pred, target, backend="torch", **keywords)
    _check_backend(backend)
    return result


class AdaptiveDPOLoss(api.AdaptiveDPOLoss):
    __doc__ = api.AdaptiveDPOLoss.__doc__
    _loss_fn = staticmethod(adaptive_dpo_loss)  # its signature makes "torch" the default backend


def _document(wrapper, function) -> None:
    """Give ``wrapper`` the docstring of ``function`` and its signature with ``backend="torch"``,
    for ``help``, ``inspect.signature`` and documentation tools."""
    signature = inspect.signature(function)
    parameters = [p.replace(default="torch") if p.name == "backend" else p for p in signature.parameters.values()]
    wrapper.__doc__ = function.__doc__
    wrapper.__signature__ = signature.replace(parameters=parameters)


_document(adaptive_dpo_loss, api.adaptive_dpo_loss)
_document(diffusion_dpo_loss, api.diffusion_dpo_loss)

__all__ = ["adaptive_dpo_loss", "diffusion_dpo_loss", "AdaptiveDPOLoss"]
