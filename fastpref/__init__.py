"""fastpref: fused Diffusion-DPO / Adaptive-DPO losses for preference fine-tuning of diffusion models.

The public API of docs/spec.md §8: ``adaptive_dpo_loss``, ``diffusion_dpo_loss``, ``AdaptiveDPOLoss``,
``availability`` and ``CHOICES`` (each option keyword's string choices) from the room
``fastpref.loss`` (which imports only torch, triton and numpy), and ``reference``, the same three
loss names on eager PyTorch. The other rooms are ``fastpref.train``,
``fastpref.demo`` and ``fastpref.testing``.
"""

from . import reference
from .loss.api import AdaptiveDPOLoss, adaptive_dpo_loss, diffusion_dpo_loss
from .loss.dispatch import availability
from .loss.options import CHOICES

__version__ = "0.1.0"

__all__ = [
    "adaptive_dpo_loss",
    "diffusion_dpo_loss",
    "AdaptiveDPOLoss",
    "reference",
    "availability",
    "CHOICES",
    "__version__",
]
