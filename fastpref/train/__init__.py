"""The trainer behind ``fastpref train``: SD1.5/SDXL preference fine-tuning on diffusers,
accelerate and peft. It uses the loss only through fastpref's public API.

``TrainConfig`` and ``PreferenceTrainer`` run the training step on encoded batches;
``PairSampler`` is the seeded, resumable data order. Importing this package loads torch and
the loss only; diffusers, accelerate and peft load when a trainer is built.
"""

from .config import TrainConfig
from .data import PairSampler
from .trainer import NonFiniteLossError, PreferenceTrainer

__all__ = ["TrainConfig", "PreferenceTrainer", "PairSampler", "NonFiniteLossError"]
