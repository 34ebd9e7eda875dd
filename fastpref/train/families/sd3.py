"""Stable Diffusion 3 / 3.5 (Medium, Large): an ``SD3Transformer2DModel`` trained by flow matching
(a ``FlowMatchEulerDiscreteScheduler``), two CLIP text encoders and a T5 encoder, as diffusers'
``train_dreambooth_lora_sd3.py`` trains it; :class:`FlowFamily` holds what SD3 and FLUX share.

Flow matching, per pair (both images share the noise and the sigma, as every family's step):
sigma is drawn from the ``weighting_scheme``'s density (``diffusers.training_utils.
compute_density_for_timestep_sampling``: uniform, logit-normal ``(logit_mean, logit_std)`` or
``mode`` with ``mode_scale``) as an index into the training scheduler's sigmas (shifted by its
``shift``); the noisy input is ``(1 - sigma) x0 + sigma noise`` and the target the velocity
``noise - x0`` (with ``precondition_outputs``: the prediction is mapped to ``x0`` as
``noisy - sigma pred`` and the target is ``x0``).

The scheme's loss weight ``w(sigma)`` (``compute_loss_weighting_for_sd3``: ``sigma_sqrt``
``sigma^-2``, ``cosmap``, else 1) enters the per-sample errors of every model alike: the
family returns ``sqrt(w) pred`` and ``sqrt(w) target`` (float32), so each per-sample error is
``w`` times the unweighted one, as diffusers' ``mean(w (pred - target)^2)`` (``docs/spec.md``,
"Per-sample loss weights").
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Optional, Sequence

import torch

from .base import FamilyDefaults, ModelFamily, TextEncoders

#: --weighting_scheme's choices, diffusers' names
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
CLIP_LENGTH = 77  # the CLIP tokenizers' length, as the pipelines


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """A flow-matching run's settings (``TrainConfig``'s flow fields, resolved for the family):
    the timestep density and loss weight (``weighting_scheme``, ``logit_mean``, ``logit_std``,
    ``mode_scale``), ``precondition_outputs``, the scheduler's ``shift`` (``None``: its config's),
    FLUX's training ``guidance_scale`` and the T5 ``max_sequence_length``."""

    weighting_scheme: str
    precondition_outputs: bool
    max_sequence_length: int
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: Optional[float] = None
    guidance_scale: float = 3.5


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values [N]`` shaped ``[N, 1, ...]`` to broadcast over ``like [N, ...]``, in float32."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


class FlowFamily(ModelFamily):
    """What the flow-matching families (SD3, FLUX) share: the flow schedule, the velocity target,
    the per-sample weight, the transformer's LoRA and full fine-tune folder. The timesteps the
    trainer passes around are the sigmas in ``(0, 1]``."""

    denoiser_folder = "transformer"
    takes_flow_options = True
    #: the family's defaults for the flow flags left unset (diffusers' script's)
    settings: FlowSettings
    #: the transformer's class name in its config.json
    transformer_class: str
    #: the validation pipeline's default steps and guidance (the pipeline's own defaults)
    inference_steps = 28

    def recognises(self, configs: Dict[str, dict]) -> bool:
        transformer = configs.get("transformer")
        return transformer is not None and transformer.get("_class_name") == self.transformer_class

    def configured(self, config) -> "FlowFamily":
        """This family with the flow fields of ``config`` (a ``TrainConfig``) that are set."""
        given = {
            "weighting_scheme": config.weighting_scheme,
            "precondition_outputs": None if config.precondition_outputs is None else bool(config.precondition_outputs),
            "max_sequence_length": config.max_sequence_length,
            "logit_mean": config.logit_mean,
            "logit_std": config.logit_std,
            "mode_scale": config.mode_scale,
            "shift": config.flow_shift,
            "guidance_scale": config.guidance_scale,
        }
        out = copy.copy(self)
        out.settings = dataclasses.replace(self.settings, **{k: v for k, v in given.items() if v is not None})
        return out

    def encoding_key(self) -> dict:
        return {"max_sequence_length": self.settings.max_sequence_length}

    def settings_note(self) -> Optional[str]:
        s = self.settings
        return (
            f"{self.title} flow matching: --weighting_scheme {s.weighting_scheme} (logit_mean {s.logit_mean:g}, "
            f"logit_std {s.logit_std:g}, mode_scale {s.mode_scale:g}), --precondition_outputs "
            f"{int(s.precondition_outputs)}, --max_sequence_length {s.max_sequence_length}"
        )

    # -- loading -------------------------------------------------------------------------------

    def load_noise_scheduler(self, source, *, is_turbo: bool = False):
        """The pipeline's ``FlowMatchEulerDiscreteScheduler``, with ``--flow_shift`` if given."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        extra = {} if self.settings.shift is None else {"shift": self.settings.shift}
        return FlowMatchEulerDiscreteScheduler.from_pretrained(
            source.path, subfolder="scheduler", revision=source.revision, **extra
        )

    def vae_dtype(self, force_upcast: bool, weight_dtype: torch.dtype) -> torch.dtype:
        """float32 unless the VAE's config says it is safe in half precision (as SDXL)."""
        return torch.float32 if force_upcast else weight_dtype

    @staticmethod
    def token_ids(tokenizer, captions: Sequence[str], length: int, device) -> torch.Tensor:
        """Token ids ``[N, length]``, padded and truncated, as the pipelines tokenize."""
        return tokenizer(
            list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)

    def t5_embeddings(self, tokenizer, encoder, captions: Sequence[str]) -> torch.Tensor:
        """T5's last hidden state ``[N, max_sequence_length, D]``."""
        ids = self.token_ids(tokenizer, captions, self.settings.max_sequence_length, next(encoder.parameters()).device)
        return encoder(ids)[0]

    # -- the training step ---------------------------------------------------------------------

    def draw_timesteps(self, scheduler, generator: torch.Generator, count: int, is_turbo: bool) -> torch.Tensor:
        """``count`` sigmas ``[count]`` float32: ``u`` from the scheme's density, the scheduler's
        sigma at index ``int(u x num_train_timesteps)`` (as diffusers' scripts)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        s = self.settings
        u = compute_density_for_timestep_sampling(
            s.weighting_scheme,
            count,
            logit_mean=s.logit_mean,
            logit_std=s.logit_std,
            mode_scale=s.mode_scale,
            generator=generator,
        )
        sigmas = scheduler.sigmas[:-1] if len(scheduler.sigmas) > len(scheduler.timesteps) else scheduler.sigmas
        index = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(sigmas) - 1)
        return sigmas[index].to(torch.float32)

    def add_noise(self, scheduler, latents, noise, timesteps):
        sigma = _per_sample(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def loss_weight(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        """The per-sample weight ``w [N]`` of the scheme (``compute_loss_weighting_for_sd3``), or
        ``None`` when it is 1."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.settings.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigmas.float())

    def _weighted(self, values: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        values = values.float()
        weight = self.loss_weight(sigmas)
        return values if weight is None else values * _per_sample(weight.sqrt(), values)

    def target(self, scheduler, latents, noise, timesteps):
        """``sqrt(w) (noise - x0)`` per image ``[2B, ...]`` float32 (``x0`` with ``precondition_outputs``)."""
        target = latents if self.settings.precondition_outputs else noise - latents
        return self._weighted(target, timesteps)

    def denoise(self, module, noisy, timesteps, inputs: dict) -> torch.Tensor:
        """``sqrt(w) pred`` float32 ``[2B, ...]``, ``pred`` preconditioned to ``noisy - sigma pred``
        with ``precondition_outputs``."""
        pred = self.transformer_call(module, noisy, timesteps, inputs).float()
        if self.settings.precondition_outputs:
            pred = noisy.float() - _per_sample(timesteps, pred) * pred
        return self._weighted(pred, timesteps)

    def transformer_call(self, module, noisy, sigmas, inputs: dict) -> torch.Tensor:
        """The transformer's raw prediction for ``noisy [2B, C, h, w]`` at ``sigmas [2B]``."""
        raise NotImplementedError

    def text_length(self) -> int:
        """The positions of the joint text the transformer reads (``encoder_hidden_states``'s L)."""
        return self.settings.max_sequence_length

    def shard_blocks(self, denoiser) -> list:
        """The transformer's blocks (FLUX's double-stream, then its single-stream ones)."""
        return [*denoiser.transformer_blocks, *getattr(denoiser, "single_transformer_blocks", [])]

    def example_batch(self, configs: Dict[str, dict], pairs: int, resolution: int) -> dict:
        """``latents [2B, C, R/f, R/f]`` (C, f: the VAE's latent channels and downsampling),
        ``encoder_hidden_states [B, L, D]`` (:meth:`text_length`, the transformer's
        ``joint_attention_dim``), ``pooled_prompt_embeds [B, P]`` and mid-schedule ``timesteps [2B]``
        (sigma 0.5)."""
        transformer, vae = configs[self.denoiser_folder], configs.get("vae", {})
        side = resolution // 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        return {
            "latents": torch.randn(2 * pairs, vae.get("latent_channels", 16), side, side),
            "encoder_hidden_states": torch.randn(pairs, self.text_length(), transformer["joint_attention_dim"]),
            "pooled_prompt_embeds": torch.randn(pairs, transformer["pooled_projection_dim"]),
            "timesteps": torch.full((2 * pairs,), 0.5),
        }

    # -- outputs -------------------------------------------------------------------------------

    def save_lora_weights(self, layers: Dict[str, torch.Tensor], folder) -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft

        # the trainer hands diffusers-format keys (SD's format); the transformer pipelines' loaders read peft's
        self.pipeline_class().save_lora_weights(
            str(folder), transformer_lora_layers=convert_unet_state_dict_to_peft(layers)
        )

    def validation_pipeline(self, source, denoiser, weight_dtype: torch.dtype, device):
        """The family's pipeline around ``denoiser`` with its own flow-matching scheduler."""
        return self.load_pipeline(source, denoiser, weight_dtype)


class SD3(FlowFamily):
    """SD3 / SD3.5: recognised by ``transformer/config.json``'s ``SD3Transformer2DModel``."""

    name = "sd3"
    title = "SD3"
    description = "SD3 / SD3.5 (an SD3Transformer2DModel, two CLIP text encoders and T5)"
    # beta: see README "Model families" (the SDXL value on the same per-sample MSE scale); k1 SDXL's.
    defaults = FamilyDefaults(beta=2500.0, k1=1.0, resolution=1024, tracker_name="diffusion-dpo-lora-sd3")
    encoder_folders = (
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    )
    # diffusers' train_dreambooth_lora_sd3.py's default --lora_layers: the joint attention's projections
    lora_targets = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    card_license = "other"
    card_tags = ("sd3", "sd3-diffusers")
    transformer_class = "SD3Transformer2DModel"
    # diffusers' SD3 script: logit-normal sigmas, preconditioned outputs, 77 T5 tokens
    settings = FlowSettings(weighting_scheme="logit_normal", precondition_outputs=True, max_sequence_length=77)
    guidance_scale = 7.0  # StableDiffusion3Pipeline's default

    def load_denoiser(self, source, dtype: torch.dtype):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(**source.part(self.denoiser_folder), torch_dtype=dtype)

    def load_text_encoders(self, source, dtype: torch.dtype, device) -> TextEncoders:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts = [
            (CLIPTokenizer, "tokenizer", CLIPTextModelWithProjection, "text_encoder"),
            (CLIPTokenizer, "tokenizer_2", CLIPTextModelWithProjection, "text_encoder_2"),
            (T5TokenizerFast, "tokenizer_3", T5EncoderModel, "text_encoder_3"),
        ]
        return _load_parts(source, parts, dtype, device)

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str], tokenizers, text_encoders) -> Dict[str, torch.Tensor]:
        """``prompt_embeds [N, max_sequence_length, D_T5]`` (T5), ``clip_prompt_embeds [N, 77,
        D1 + D2]`` (both CLIPs' penultimate hidden states, concatenated) and
        ``pooled_prompt_embeds [N, P1 + P2]`` (their projected pooled outputs), as
        ``StableDiffusion3Pipeline.encode_prompt``; stored apart so that the cache keeps no padding."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(tokenizers[:2], text_encoders[:2]):
            ids = self.token_ids(tokenizer, captions, CLIP_LENGTH, next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        return {
            "prompt_embeds": self.t5_embeddings(tokenizers[2], text_encoders[2], captions),
            "clip_prompt_embeds": torch.cat(hidden, dim=-1),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def text_length(self) -> int:
        """CLIP's 77 positions, then T5's ``max_sequence_length`` (:meth:`batch_conditioning`)."""
        return CLIP_LENGTH + self.settings.max_sequence_length

    def batch_conditioning(self, batch: dict, resolution: int) -> Dict[str, torch.Tensor]:
        """``encoder_hidden_states [B, 77 + L, D_T5]``: the CLIP embeddings zero-padded to T5's
        width, then T5's (the pipeline's joint text), and ``pooled_prompt_embeds [B, P]``."""
        t5, clip = batch["prompt_embeds"], batch["clip_prompt_embeds"]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_prompt_embeds": batch["pooled_prompt_embeds"],
        }

    def denoiser_inputs(self, batch: dict, device, dtype: torch.dtype) -> dict:
        """``encoder_hidden_states [2B, L, D]`` and ``pooled_projections [2B, P]``, each pair's for both images."""
        text, pooled = batch["encoder_hidden_states"], batch["pooled_prompt_embeds"]
        _check_pairs(batch, text)
        text, pooled = text.to(device, dtype), pooled.to(device, dtype)
        return {"encoder_hidden_states": torch.cat([text, text]), "pooled_projections": torch.cat([pooled, pooled])}

    def transformer_call(self, module, noisy, sigmas, inputs: dict) -> torch.Tensor:
        """The transformer at timestep ``1000 sigma`` (the scheduler's timesteps are its sigmas x
        num_train_timesteps, 1000 in every SD3 config)."""
        return module(
            hidden_states=noisy,
            timestep=sigmas * 1000.0,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def sampling(self, is_turbo: bool, steps: Optional[int]) -> dict:
        return dict(
            num_inference_steps=steps or self.inference_steps,
            guidance_scale=self.guidance_scale,
            max_sequence_length=self.settings.max_sequence_length,
        )


def _check_pairs(batch: dict, text: torch.Tensor) -> None:
    if batch["latents"].shape[0] != 2 * text.shape[0]:
        raise ValueError(
            f"latents must be [2B, ...] (winners then losers) for B = {text.shape[0]} pairs of text "
            f"embeddings, got {tuple(batch['latents'].shape)}"
        )


def _load_parts(source, parts, dtype: torch.dtype, device) -> TextEncoders:
    """``(tokenizer class, folder, encoder class, folder)`` of each text encoder, loaded."""
    tokenizers, encoders = [], []
    for tokenizer_class, tokenizer, encoder_class, encoder in parts:
        tokenizers.append(tokenizer_class.from_pretrained(source.path, subfolder=tokenizer, revision=source.revision))
        encoders.append(encoder_class.from_pretrained(**source.part(encoder), torch_dtype=dtype).to(device).eval())
    return TextEncoders(tokenizers, encoders)


__all__ = ["SD3", "FlowFamily", "FlowSettings", "WEIGHTING_SCHEMES"]
