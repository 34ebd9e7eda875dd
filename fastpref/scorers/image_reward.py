"""ImageReward (Xu et al. 2023): a BLIP reward model trained on ImageRewardDB comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Scorer

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"


class ImageReward(Scorer):
    """The ``image-reward`` package's ``ImageReward-v1.0`` (``THUDM/ImageReward``) and its
    ``score(prompt, image)``: the reward standardised by the package's own mean and std, about
    -2 to 2 (0 is ImageRewardDB's average). A local folder holds ``ImageReward.pt`` and
    ``med_config.json``."""

    name = "imagereward"
    title = "ImageReward"
    weights = {"model": "ImageReward-v1.0"}
    scale = "standardised reward (about -2 to 2)"
    reference = "THUDM/ImageReward, ImageReward.load('ImageReward-v1.0').score"
    packages = ("ImageReward",)
    extra = "imagereward"

    def load(self, sources):
        import ImageReward as reward

        folder = Path(sources["model"]).expanduser()
        if folder.is_dir():
            self.model = reward.load(
                str(folder / CHECKPOINT), device=str(self.device), med_config=str(folder / MED_CONFIG)
            )
        else:
            self.model = reward.load(sources["model"], device=str(self.device))

    @torch.no_grad()
    def score(self, images, prompts):
        return torch.tensor([float(self.model.score(p, [image])) for image, p in zip(images, prompts)])
