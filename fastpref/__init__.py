"""fastpref: fused Diffusion-DPO / Adaptive-DPO losses for preference fine-tuning of diffusion models.

Public API (spec §8):

- ``adaptive_dpo_loss(model_pred, ref_pred, target, *, ema_preds=(), ...)``
- ``diffusion_dpo_loss(model_pred, ref_pred, target, *, beta=1000.0, ...)``
- ``AdaptiveDPOLoss(**keywords)``: the ``torch.nn.Module`` form
- ``reference``: the eager PyTorch implementation with the same signatures
- ``availability(device)``: which backends can run on a device, and why not
"""

from . import dispatch, reference
from .dispatch import availability
from .frontend import make_adaptive_dpo_loss, make_diffusion_dpo_loss, make_loss_module

__version__ = "0.1.0"

adaptive_dpo_loss = make_adaptive_dpo_loss(dispatch.run, default_backend="auto", module_name=__name__)
diffusion_dpo_loss = make_diffusion_dpo_loss(adaptive_dpo_loss, default_backend="auto", module_name=__name__)
AdaptiveDPOLoss = make_loss_module(adaptive_dpo_loss, default_backend="auto", module_name=__name__)

__all__ = ["adaptive_dpo_loss", "diffusion_dpo_loss", "AdaptiveDPOLoss", "reference", "availability", "__version__"]
