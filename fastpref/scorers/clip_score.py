"""CLIP score (Hessel et al. 2021, "CLIPScore"), with torchmetrics' convention."""

from __future__ import annotations

import torch

from .base import Scorer
from .clip_features import cosine, load_clip


class CLIPScore(Scorer):
    """``100 * max(cos(image, prompt), 0)`` with ``openai/clip-vit-large-patch14``, as
    ``torchmetrics.multimodal.CLIPScore`` (its default model; per image, not averaged): about
    20-35 for matching prompts. (Hessel et al.'s CLIP-S is ``2.5 * max(cos, 0)`` with ViT-B/32.)"""

    name = "clip"
    title = "CLIP score"
    weights = {"model": "openai/clip-vit-large-patch14", "processor": "openai/clip-vit-large-patch14"}
    scale = "100 * max(cosine, 0) (about 20-35)"
    reference = "torchmetrics.multimodal.CLIPScore (default model openai/clip-vit-large-patch14)"

    def load(self, sources):
        self.model, self.processor = load_clip(sources["model"], sources["processor"], self.device, self.dtype)

    @torch.no_grad()
    def score(self, images, prompts):
        return (100.0 * cosine(self.model, self.processor, images, prompts).clamp(min=0)).cpu()
