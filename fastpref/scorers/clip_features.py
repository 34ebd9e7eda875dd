"""Projected CLIP embeddings of a transformers ``CLIPModel``, L2-normalised, shared by the
CLIP-based scorers (written from the model's parts, which every transformers version keeps)."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def image_embeds(model, processor, images: Sequence) -> torch.Tensor:
    """``[N, projection_dim]`` unit-norm image embeddings of PIL ``images`` (the processor's
    resize, centre crop and normalisation)."""
    parameter = next(model.parameters())
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    pooled = model.vision_model(pixel_values=pixels.to(parameter.device, parameter.dtype)).pooler_output
    embeds = model.visual_projection(pooled).float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


@torch.no_grad()
def text_embeds(model, processor, prompts: Sequence[str]) -> torch.Tensor:
    """``[N, projection_dim]`` unit-norm text embeddings, prompts padded and truncated to the
    text model's length (77)."""
    device = next(model.parameters()).device
    tokens = processor(
        text=list(prompts),
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    )
    pooled = model.text_model(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    ).pooler_output
    embeds = model.text_projection(pooled).float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


def cosine(model, processor, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
    """``[N]`` float32 cosine similarity of each image with its prompt (``images[i]``, ``prompts[i]``)."""
    return (image_embeds(model, processor, images) * text_embeds(model, processor, prompts)).sum(-1)


def load_clip(model_source: str, processor_source: str, device, dtype):
    """``(CLIPModel in eval mode on device, CLIPProcessor)``."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_source, torch_dtype=dtype).to(device).eval()
    return model, CLIPProcessor.from_pretrained(processor_source)
