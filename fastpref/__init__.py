"""fastpref: fused Diffusion-DPO / Adaptive-DPO losses for preference fine-tuning of diffusion models.

Public API (docs/spec.md §8):

- ``adaptive_dpo_loss(model_pred, ref_pred, target, *, ema_preds=(), ...)``
- ``diffusion_dpo_loss(model_pred, ref_pred, target, *, beta=1000.0, ...)``
- ``AdaptiveDPOLoss(**keywords)``: the ``torch.nn.Module`` form
- ``reference``: the eager PyTorch implementation with the same signatures
- ``availability(device)``: which backends can run on a device, and why not

The package has three rooms: ``fastpref.loss`` (everything above; imports only torch, triton and
numpy), ``fastpref.train`` (``fastpref train``) and ``fastpref.demo`` (``fastpref demo``), plus
``fastpref.testing`` (offline tiny models and toy data for tests and users).
"""

from . import reference
from .loss.api import AdaptiveDPOLoss, adaptive_dpo_loss, diffusion_dpo_loss
from .loss.dispatch import availability

__version__ = "0.1.0"

__all__ = ["adaptive_dpo_loss", "diffusion_dpo_loss", "AdaptiveDPOLoss", "reference", "availability", "__version__"]
