"""HPS v2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H/14 fine-tuned on HPD v2."""

from __future__ import annotations

import torch

from .base import Scorer, hub_file

ARCHITECTURE = "ViT-H-14"
CHECKPOINT = "HPS_v2.1_compressed.pt"


class HPSv2(Scorer):
    """``cos(image, prompt)`` of open_clip's ``ViT-H-14`` with ``xswu/HPSv2``'s
    ``HPS_v2.1_compressed.pt`` (its ``state_dict``), open_clip's validation transform (224 px,
    OpenAI mean/std) and tokenizer, as ``hpsv2.score`` (``hpsv2/img_score.py``): the raw
    cosine, about 0.25-0.35 (the HPSv2 leaderboard prints it x 100)."""

    name = "hpsv2"
    title = "HPS v2.1"
    weights = {"model": "xswu/HPSv2"}
    scale = "cosine (about 0.25-0.35; x 100 on the HPSv2 leaderboard)"
    reference = "tgxs002/HPSv2, hpsv2/img_score.py (v2.1 checkpoint)"
    packages = ("open_clip",)
    extra = "hpsv2"

    def load(self, sources):
        import open_clip

        model, _, self.preprocess = open_clip.create_model_and_transforms(ARCHITECTURE, pretrained=None)
        checkpoint = torch.load(hub_file(sources["model"], CHECKPOINT), map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(ARCHITECTURE)

    @torch.no_grad()
    def score(self, images, prompts):
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        image = self.model.encode_image(pixels, normalize=True).float()
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True).float()
        return (image * text).sum(-1).cpu()
