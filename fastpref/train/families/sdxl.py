"""Stable Diffusion XL (and SDXL Turbo): a UNet with added text-time conditioning (the pooled
embedding of the second text encoder and six time ids per image), two CLIP text encoders whose
penultimate hidden states are concatenated (diffusers' ``train_diffusion_dpo_sdxl.py``)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .base import FamilyDefaults
from .sd15 import SD15

TURBO_STEPS = 4  # SDXL Turbo samples with 4 steps; --is_turbo trains on their timesteps (249, 499, 749, 999)


class SDXL(SD15):
    """SDXL: the SD family with ``addition_embed_type == "text_time"``."""

    name = "sdxl"
    title = "SDXL"
    description = "SDXL (a UNet with text_time conditioning, two CLIP text encoders)"
    defaults = FamilyDefaults(beta=2500.0, k1=1.0, resolution=1024, tracker_name="diffusion-dpo-lora-sdxl")
    encoder_folders = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    card_license = "openrail++"
    card_tags = ("stable-diffusion-xl",)
    guidance_scale = 5.0  # diffusers' SDXL DPO script's
    addition_embed_type = "text_time"
    has_turbo = True

    def vae_dtype(self, force_upcast: bool, weight_dtype: torch.dtype) -> torch.dtype:
        """float32 (SDXL's VAE overflows in float16, as in diffusers' SDXL script) unless its
        config says it is fp16-safe (``force_upcast: false``, as ``madebyollin/sdxl-vae-fp16-fix``)."""
        return torch.float32 if force_upcast else weight_dtype

    def text_encoder_parts(self):
        from transformers import CLIPTextModelWithProjection

        return super().text_encoder_parts() + [("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection)]

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str], tokenizers, text_encoders) -> Dict[str, torch.Tensor]:
        """``{"prompt_embeds": [N, L, D1 + D2], "pooled_prompt_embeds": [N, P]}``: the penultimate
        hidden states of both encoders, concatenated, and the second's projected pooled output."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(
                self.token_ids(tokenizer, captions, next(encoder.parameters()).device), output_hidden_states=True
            )
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
            if pooled is None:
                pooled = out.pooler_output
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def batch_conditioning(self, batch: dict, resolution: int) -> Dict[str, torch.Tensor]:
        """Adds ``pooled_prompt_embeds [B, P]`` and ``add_time_ids [2B, 6]``: (original h, w, crop
        top, left, target h, w) per image."""
        sizes = batch["original_sizes"]
        target = torch.tensor([resolution, resolution], dtype=torch.int64).expand(sizes.shape[0], 2)
        return {
            **super().batch_conditioning(batch, resolution),
            "pooled_prompt_embeds": batch["pooled_prompt_embeds"],
            "add_time_ids": torch.cat([sizes, batch["crop_top_lefts"], target], dim=-1).float(),
        }

    def draw_timesteps(self, scheduler, generator: torch.Generator, count: int, is_turbo: bool) -> torch.Tensor:
        """Uniform integer timesteps; with ``is_turbo`` moved onto SDXL Turbo's 4-step grid, as
        diffusers' SDXL script."""
        timesteps = super().draw_timesteps(scheduler, generator, count, is_turbo)
        if is_turbo:
            stride = scheduler.config.num_train_timesteps // TURBO_STEPS
            timesteps = stride * (timesteps % TURBO_STEPS) + stride - 1
        return timesteps

    def denoiser_inputs(self, batch: dict, device, dtype: torch.dtype) -> dict:
        """As SD 1.5, plus ``added_cond_kwargs``: the pooled embedding per pair, repeated, and the
        time ids per image."""
        inputs = super().denoiser_inputs(batch, device, dtype)
        pooled = batch["pooled_prompt_embeds"].to(device, dtype)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.cat([pooled, pooled]),
            "time_ids": batch["add_time_ids"].to(device, dtype),
        }
        return inputs

    def example_batch(self, configs: Dict[str, dict], pairs: int, resolution: int) -> dict:
        """As SD 1.5's, plus ``pooled_prompt_embeds [B, P]`` and ``add_time_ids [2B, 6]``."""
        batch = super().example_batch(configs, pairs, resolution)
        unet = configs["unet"]
        pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        batch["pooled_prompt_embeds"] = torch.randn(pairs, pooled)
        batch["add_time_ids"] = torch.full((2 * pairs, 6), float(resolution))
        return batch

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def validation_pipeline(self, source, denoiser, weight_dtype: torch.dtype, device):
        """``StableDiffusionXLPipeline`` with its own scheduler, as diffusers' SDXL DPO script; its
        VAE decodes in its own dtype (:func:`decode_in_vae_dtype`)."""
        pipeline = self.load_pipeline(source, denoiser, weight_dtype)
        decode_in_vae_dtype(pipeline.vae)
        return pipeline

    def sampling(self, is_turbo: bool, steps: Optional[int]) -> dict:
        """SDXL Turbo samples with its 4 steps and no guidance."""
        if is_turbo:
            return dict(num_inference_steps=steps or TURBO_STEPS, guidance_scale=0.0)
        return super().sampling(is_turbo, steps)

    def beta_note(self, beta: float) -> Optional[str]:
        return (
            f"--beta_dpo {beta:g}: fastpref's scale for every model family; diffusers' train_diffusion_dpo_sdxl.py "
            f"halves its --beta_dpo (its --beta_dpo {2 * beta:g} is this run's)"
        )


def decode_in_vae_dtype(vae) -> None:
    """Make ``vae.decode`` take latents of any dtype and decode them in the VAE's own, autocast
    off. SDXL's VAE is float32 under fp16 mixed precision (:meth:`SDXL.vae_dtype`), and the pipeline
    hands it the denoiser's float16 latents: without autocast (CPU) the convolution refuses them,
    with it (CUDA) the VAE would run in float16, which it overflows in."""
    decode = vae.decode

    def decode_cast(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_cast
