"""The eager PyTorch implementation of the public API: the same three names and signatures as
``fastpref``, always run by the ``"torch"`` backend (``fastpref.loss.reference``)."""

from .loss.reference import AdaptiveDPOLoss, adaptive_dpo_loss, diffusion_dpo_loss

__all__ = ["adaptive_dpo_loss", "diffusion_dpo_loss", "AdaptiveDPOLoss"]
