"""Where a run's diffusers parts come from, and in which dtype they run: :class:`ModelSource`
(``--pretrained_model_name_or_path``, ``--revision``, ``--variant``,
``--pretrained_vae_model_name_or_path``) and :func:`vae_dtype` (SDXL's VAE in float32 unless
it is fp16-safe, as diffusers' SDXL script)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A diffusers pipeline (local folder or Hub id) at a ``revision``, with the weight files of
    ``variant`` (e.g. ``"fp16"``), and optionally another VAE (``vae_path``: a VAE folder or Hub
    id whose weights are at its root, as ``madebyollin/sdxl-vae-fp16-fix``)."""

    path: str
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae_path: Optional[str] = None

    @classmethod
    def of(cls, data_args) -> "ModelSource":
        """The source named by ``fastpref train``'s :class:`~fastpref.train.cli.DataArguments`."""
        return cls(
            str(data_args.pretrained_model_name_or_path),
            data_args.revision,
            data_args.variant,
            data_args.pretrained_vae_model_name_or_path,
        )

    def part(self, subfolder: str) -> dict:
        """``from_pretrained`` arguments of one part of the pipeline (``"unet"``, ``"text_encoder"``...)."""
        return dict(
            pretrained_model_name_or_path=self.path, subfolder=subfolder, revision=self.revision, variant=self.variant
        )

    def vae(self) -> dict:
        """``from_pretrained`` arguments of the VAE: ``vae_path`` (its root, read with the run's
        revision and variant, as diffusers' SDXL script reads it) or the pipeline's ``vae/``."""
        if self.vae_path is None:
            return self.part("vae")
        return dict(pretrained_model_name_or_path=self.vae_path, revision=self.revision, variant=self.variant)

    def load_unet(self, dtype: torch.dtype):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(**self.part("unet"), torch_dtype=dtype)

    def load_noise_scheduler(self, zero_terminal_snr: bool = False):
        """The pipeline's ``DDPMScheduler``; ``zero_terminal_snr`` rescales its betas so the last
        timestep is pure noise (diffusers' ``rescale_betas_zero_snr``; ``--is_turbo``)."""
        from diffusers import DDPMScheduler

        extra = {"rescale_betas_zero_snr": True} if zero_terminal_snr else {}
        return DDPMScheduler.from_pretrained(self.path, subfolder="scheduler", revision=self.revision, **extra)

    def load_vae(self, arch: str, weight_dtype: torch.dtype):
        """The VAE in :func:`vae_dtype`."""
        from diffusers import AutoencoderKL

        where = self.vae()
        config = AutoencoderKL.load_config(**{k: v for k, v in where.items() if k != "variant"})
        dtype = vae_dtype(arch, config.get("force_upcast", True), weight_dtype)
        return AutoencoderKL.from_pretrained(**where, torch_dtype=dtype)

    def load_encoders(self, arch: str, weight_dtype: torch.dtype = torch.float32, device="cpu"):
        """``(vae, tokenizers, text_encoders)`` in eval mode on ``device``: the VAE in
        :func:`vae_dtype`, the text encoder(s) in ``weight_dtype``; two of each for SDXL."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        vae = self.load_vae(arch, weight_dtype).to(device).eval()
        kinds = [("tokenizer", "text_encoder", CLIPTextModel)]
        if arch == "sdxl":
            kinds.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
        tokenizers, text_encoders = [], []
        for tokenizer, encoder, encoder_class in kinds:
            tokenizers.append(CLIPTokenizer.from_pretrained(self.path, subfolder=tokenizer, revision=self.revision))
            text_encoders.append(
                encoder_class.from_pretrained(**self.part(encoder), torch_dtype=weight_dtype).to(device).eval()
            )
        return vae, tokenizers, text_encoders


def vae_dtype(arch: str, force_upcast: bool, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: SDXL's VAE overflows in float16, so it runs in float32 (as in
    diffusers' SDXL script) unless its config says it is fp16-safe (``force_upcast: false``, as
    ``madebyollin/sdxl-vae-fp16-fix``, passed with ``--pretrained_vae_model_name_or_path``);
    SD 1.5's runs in ``weight_dtype`` (the mixed precision's), as in diffusers' SD script."""
    if arch == "sdxl" and force_upcast:
        return torch.float32
    return weight_dtype
