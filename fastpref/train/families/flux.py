"""FLUX.1 (dev, schnell): a ``FluxTransformer2DModel`` trained by flow matching on 2x2-packed
latents, conditioned on T5's sequence and CLIP's pooled embedding, with a guidance embedding in
the guidance-distilled ``dev`` (diffusers' ``train_dreambooth_lora_flux.py``). The flow schedule,
target and per-sample weight are :class:`~fastpref.train.families.sd3.FlowFamily`'s."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .base import FamilyDefaults, TextEncoders
from .sd3 import CLIP_LENGTH, FlowFamily, FlowSettings, _check_pairs, _load_parts

VAE_SCALE_FACTOR = 8  # the FLUX VAE's downsampling; latents are packed in 2x2 patches on top


class FLUX(FlowFamily):
    """FLUX.1: recognised by ``transformer/config.json``'s ``FluxTransformer2DModel``."""

    name = "flux"
    title = "FLUX.1"
    description = "FLUX.1 dev / schnell (a FluxTransformer2DModel, CLIP and T5)"
    # beta: see README "Model families"; k1 SDXL's.
    defaults = FamilyDefaults(beta=2500.0, k1=1.0, resolution=1024, tracker_name="diffusion-dpo-lora-flux")
    encoder_folders = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    # diffusers' train_dreambooth_lora_flux.py's default targets: attention and feed-forward layers
    lora_targets = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    card_license = "other"
    card_tags = ("flux", "flux-diffusers")
    transformer_class = "FluxTransformer2DModel"
    resolution_multiple = 2 * VAE_SCALE_FACTOR  # 2x2 packed latents
    # diffusers' FLUX script: uniform sigmas, no preconditioning, 512 T5 tokens, guidance 3.5
    settings = FlowSettings(weighting_scheme="none", precondition_outputs=False, max_sequence_length=512)

    def load_denoiser(self, source, dtype: torch.dtype):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(**source.part(self.denoiser_folder), torch_dtype=dtype)

    def load_text_encoders(self, source, dtype: torch.dtype, device) -> TextEncoders:
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts = [
            (CLIPTokenizer, "tokenizer", CLIPTextModel, "text_encoder"),
            (T5TokenizerFast, "tokenizer_2", T5EncoderModel, "text_encoder_2"),
        ]
        return _load_parts(source, parts, dtype, device)

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str], tokenizers, text_encoders) -> Dict[str, torch.Tensor]:
        """``prompt_embeds [N, max_sequence_length, D_T5]`` (T5's last hidden state) and
        ``pooled_prompt_embeds [N, P]`` (CLIP's pooled output), as ``FluxPipeline.encode_prompt``."""
        clip, encoder = tokenizers[0], text_encoders[0]
        ids = self.token_ids(clip, captions, CLIP_LENGTH, next(encoder.parameters()).device)
        return {
            "prompt_embeds": self.t5_embeddings(tokenizers[1], text_encoders[1], captions),
            "pooled_prompt_embeds": encoder(ids, output_hidden_states=False).pooler_output,
        }

    def batch_conditioning(self, batch: dict, resolution: int) -> Dict[str, torch.Tensor]:
        return {"encoder_hidden_states": batch["prompt_embeds"], "pooled_prompt_embeds": batch["pooled_prompt_embeds"]}

    def denoiser_inputs(self, batch: dict, device, dtype: torch.dtype) -> dict:
        """``encoder_hidden_states [2B, L, D]``, ``pooled_projections [2B, P]`` (each pair's for
        both images) and ``txt_ids [L, 3]`` (zeros, as the pipeline). ``ValueError`` unless the
        latents' sides are even (2x2 packing: a resolution that is a multiple of 16)."""
        text, pooled = batch["encoder_hidden_states"], batch["pooled_prompt_embeds"]
        _check_pairs(batch, text)
        if batch["latents"].shape[-1] % 2 or batch["latents"].shape[-2] % 2:
            raise ValueError(
                f"FLUX packs latents in 2x2 patches: their sides must be even (a resolution that is a multiple of "
                f"16), got latents {tuple(batch['latents'].shape)}"
            )
        text, pooled = text.to(device, dtype), pooled.to(device, dtype)
        return {
            "encoder_hidden_states": torch.cat([text, text]),
            "pooled_projections": torch.cat([pooled, pooled]),
            "txt_ids": torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
        }

    def transformer_call(self, module, noisy, sigmas, inputs: dict) -> torch.Tensor:
        """Pack ``noisy [2B, C, h, w]`` into ``[2B, hw/4, 4C]`` with its image ids, call the
        transformer at timestep ``sigma`` (it scales by 1000 itself) with the training
        ``guidance_scale`` where it has a guidance embedding (dev), unpack the prediction."""
        from diffusers import FluxPipeline

        count, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, count, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, noisy.device, noisy.dtype)
        guidance = None
        if getattr(module, "module", module).config.guidance_embeds:  # module may be DDP-wrapped
            guidance = torch.full((count,), self.settings.guidance_scale, device=noisy.device, dtype=torch.float32)
        pred = module(
            hidden_states=packed,
            timestep=sigmas.to(noisy.device),
            guidance=guidance,
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=inputs["txt_ids"],
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(pred, height * VAE_SCALE_FACTOR, width * VAE_SCALE_FACTOR, VAE_SCALE_FACTOR)

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def sampling(self, is_turbo: bool, steps: Optional[int]) -> dict:
        """The pipeline's 28 steps at the training ``guidance_scale`` (schnell's transformer has no
        guidance embedding: the pipeline ignores it)."""
        return dict(
            num_inference_steps=steps or self.inference_steps,
            guidance_scale=self.settings.guidance_scale,
            max_sequence_length=self.settings.max_sequence_length,
        )
