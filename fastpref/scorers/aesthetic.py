"""The LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann): an MLP on
CLIP ViT-L/14 image embeddings, trained on SAC + LAION-Logos + AVA ratings (1-10)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Scorer, hub_file
from .clip_features import image_embeds, load_clip

MLP_FILE = "aesthetic-model.pth"


class AestheticMLP(nn.Module):
    """The predictor's head, the layout of improved-aesthetic-predictor's ``MLP`` (and TRL's DDPO
    copy): ``layers`` = Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
    Dropout, Linear(64, 16), Linear(16, 1); ``d`` = 768 for ViT-L/14. ``[N, d] -> [N]``."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


class Aesthetic(Scorer):
    """The MLP of ``trl-lib/ddpo-aesthetic-predictor`` (``aesthetic-model.pth``: the
    ``sac+logos+ava1-l14-linearMSE.pth`` weights) on the unit-norm image embedding of
    ``openai/clip-vit-large-patch14``, as improved-aesthetic-predictor's ``simple_inference.py``
    and TRL's ``aesthetic_scorer``: a rating on AVA's 1-10 scale (about 5-6.5 for SD images).
    The prompt is not used."""

    name = "aesthetic"
    title = "LAION aesthetic"
    weights = {
        "clip": "openai/clip-vit-large-patch14",
        "processor": "openai/clip-vit-large-patch14",
        "mlp": "trl-lib/ddpo-aesthetic-predictor",
    }
    scale = "AVA rating, 1-10 (about 5-6.5)"
    reference = "christophschuhmann/improved-aesthetic-predictor, simple_inference.py (sac+logos+ava1-l14-linearMSE)"

    def load(self, sources):
        self.model, self.processor = load_clip(sources["clip"], sources["processor"], self.device, self.dtype)
        self.mlp = AestheticMLP(self.model.config.projection_dim)
        state = torch.load(hub_file(sources["mlp"], MLP_FILE), map_location="cpu", weights_only=True)
        self.mlp.load_state_dict(state)
        self.mlp.to(self.device).eval()

    @torch.no_grad()
    def score(self, images, prompts):
        embeds = image_embeds(self.model, self.processor, images)
        return self.mlp(embeds.to(self.device)).float().cpu()
