"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences."""

from __future__ import annotations

import torch

from .base import Scorer
from .clip_features import cosine, load_clip


class PickScore(Scorer):
    """``logit_scale.exp() * cos(image, prompt)`` of ``yuvalkirstain/PickScore_v1`` with the
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor, as the official README
    (github.com/yuvalkirstain/PickScore) computes its ``scores`` before the softmax over images:
    about 18-23 for SD images (logit_scale.exp() is 100 there; neither the raw cosine nor
    divided by 26)."""

    name = "pickscore"
    title = "PickScore"
    weights = {"model": "yuvalkirstain/PickScore_v1", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
    scale = "logit_scale.exp() * cosine (about 18-23)"
    reference = "the PickScore README (yuvalkirstain/PickScore), scores before the softmax"

    def load(self, sources):
        self.model, self.processor = load_clip(sources["model"], sources["processor"], self.device, self.dtype)

    @torch.no_grad()
    def score(self, images, prompts):
        return (self.model.logit_scale.exp().float() * cosine(self.model, self.processor, images, prompts)).cpu()
