"""Stable Diffusion 1.x / 2.x: a ``UNet2DConditionModel`` without added conditioning, one CLIP
text encoder, a DDPM noise schedule with epsilon or v targets (diffusers' ``train_diffusion_dpo.py``)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .base import FamilyDefaults, ModelFamily, TextEncoders

INFERENCE_STEPS = 25  # diffusers' DPO scripts sample validation images with 25 steps


class SD15(ModelFamily):
    """SD 1.5 (and any UNet pipeline whose UNet adds no conditioning to the text's)."""

    name = "sd15"
    title = "SD 1.5"
    description = "SD 1.5 (a UNet with no added conditioning, one CLIP text encoder)"
    # The Adaptive-DPO paper's SD 1.5 settings; diffusers' SD script's tracker name.
    defaults = FamilyDefaults(beta=1000.0, k1=10.0, resolution=512, tracker_name="diffusion-dpo-lora")
    encoder_folders = ("vae", "text_encoder", "tokenizer")
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    card_license = "creativeml-openrail-m"
    card_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    guidance_scale = 7.5  # StableDiffusionPipeline's default
    #: UNet2DConditionModel's ``addition_embed_type`` of the family
    addition_embed_type: Optional[str] = None

    def recognises(self, configs: Dict[str, dict]) -> bool:
        unet = configs.get("unet")
        return unet is not None and unet.get("addition_embed_type") == self.addition_embed_type

    # -- loading -------------------------------------------------------------------------------

    def load_denoiser(self, source, dtype: torch.dtype):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(**source.part(self.denoiser_folder), torch_dtype=dtype)

    def load_noise_scheduler(self, source, *, is_turbo: bool = False):
        """The pipeline's ``DDPMScheduler``; ``is_turbo`` rescales its betas so that the last
        timestep is pure noise (diffusers' ``rescale_betas_zero_snr``)."""
        from diffusers import DDPMScheduler

        extra = {"rescale_betas_zero_snr": True} if is_turbo else {}
        return DDPMScheduler.from_pretrained(source.path, subfolder="scheduler", revision=source.revision, **extra)

    def text_encoder_parts(self):
        """``(tokenizer folder, encoder folder, encoder class)`` of each text encoder."""
        from transformers import CLIPTextModel

        return [("tokenizer", "text_encoder", CLIPTextModel)]

    def load_text_encoders(self, source, dtype: torch.dtype, device) -> TextEncoders:
        from transformers import CLIPTokenizer

        tokenizers, encoders = [], []
        for tokenizer, encoder, encoder_class in self.text_encoder_parts():
            tokenizers.append(CLIPTokenizer.from_pretrained(source.path, subfolder=tokenizer, revision=source.revision))
            encoders.append(encoder_class.from_pretrained(**source.part(encoder), torch_dtype=dtype).to(device).eval())
        return TextEncoders(tokenizers, encoders)

    # -- encoding ------------------------------------------------------------------------------

    @staticmethod
    def token_ids(tokenizer, captions: Sequence[str], device) -> torch.Tensor:
        """The captions' token ids, padded and truncated to the tokenizer's length, as the pipelines."""
        return tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str], tokenizers, text_encoders) -> Dict[str, torch.Tensor]:
        """``{"prompt_embeds": [N, L, D]}``: the text encoder's last hidden state, as the pipeline."""
        (tokenizer,), (encoder,) = tokenizers, text_encoders
        ids = self.token_ids(tokenizer, captions, next(encoder.parameters()).device)
        return {"prompt_embeds": encoder(ids).last_hidden_state}

    def batch_conditioning(self, batch: dict, resolution: int) -> Dict[str, torch.Tensor]:
        return {"encoder_hidden_states": batch["prompt_embeds"]}

    # -- the training step ---------------------------------------------------------------------

    def draw_timesteps(self, scheduler, generator: torch.Generator, count: int, is_turbo: bool) -> torch.Tensor:
        """Uniform integer timesteps in ``[0, num_train_timesteps)``."""
        return torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)

    def add_noise(self, scheduler, latents, noise, timesteps):
        return scheduler.add_noise(latents, noise, timesteps)

    def target(self, scheduler, latents, noise, timesteps):
        """The noise, shared by both images of a pair (``[B, ...]``; epsilon prediction), or the
        velocity (``[2B, ...]``; v prediction)."""
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise[: latents.shape[0] // 2]
        if prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    def denoiser_inputs(self, batch: dict, device, dtype: torch.dtype) -> dict:
        """``encoder_hidden_states [2B, L, D]`` (each pair's text for both of its images)."""
        cond = batch["encoder_hidden_states"]
        if batch["latents"].shape[0] != 2 * cond.shape[0]:
            raise ValueError(
                f"latents must be [2B, ...] (winners then losers) for B = {cond.shape[0]} pairs of "
                f"encoder_hidden_states, got {tuple(batch['latents'].shape)}"
            )
        cond = cond.to(device, dtype)
        return {"encoder_hidden_states": torch.cat([cond, cond]), "added_cond_kwargs": None}

    def denoise(self, module, noisy, timesteps, inputs: dict) -> torch.Tensor:
        return module(
            noisy, timesteps, inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"]
        ).sample

    # -- memory --------------------------------------------------------------------------------

    def shard_blocks(self, denoiser) -> list:
        """The UNet's down blocks, mid block and up blocks, each after the transformer layers inside
        it (its attentions' ``transformer_blocks``), which are sharded on their own: SDXL's first up
        block holds 1.2B parameters, 30 layers of 34M; the block keeps the rest (its resnets,
        the attentions' projections, the sampler)."""
        mid = [denoiser.mid_block] if denoiser.mid_block is not None else []
        units = []
        for block in [*denoiser.down_blocks, *mid, *denoiser.up_blocks]:
            for attention in getattr(block, "attentions", None) or ():
                units.extend(getattr(attention, "transformer_blocks", ()))
            units.append(block)
        return units

    def example_batch(self, configs: Dict[str, dict], pairs: int, resolution: int) -> dict:
        """``latents [2B, C, R/f, R/f]`` (f: the VAE's downsampling, 2 per block after the first)
        and ``encoder_hidden_states [B, L, D]`` (L: the text encoder's positions, D: the UNet's
        cross-attention width)."""
        unet = configs["unet"]
        vae = configs.get("vae", {})
        factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        length = configs.get("text_encoder", {}).get("max_position_embeddings", 77)
        side = resolution // factor
        return {
            "latents": torch.randn(2 * pairs, unet["in_channels"], side, side),
            "encoder_hidden_states": torch.randn(pairs, length, unet["cross_attention_dim"]),
        }

    # -- outputs -------------------------------------------------------------------------------

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def save_lora_weights(self, layers: Dict[str, torch.Tensor], folder) -> None:
        self.pipeline_class().save_lora_weights(str(folder), unet_lora_layers=layers)

    def validation_pipeline(self, source, denoiser, weight_dtype: torch.dtype, device):
        """``StableDiffusionPipeline`` (no safety checker) with ``DPMSolverMultistepScheduler``,
        as diffusers' SD DPO script."""
        from diffusers import DPMSolverMultistepScheduler

        pipeline = self.load_pipeline(
            source, denoiser, weight_dtype, safety_checker=None, requires_safety_checker=False
        )
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
        return pipeline

    def sampling(self, is_turbo: bool, steps: Optional[int]) -> dict:
        return dict(num_inference_steps=steps or INFERENCE_STEPS, guidance_scale=self.guidance_scale)
